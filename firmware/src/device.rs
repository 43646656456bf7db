//! The device: sensor → detector → event → MQTT client, driven by one `poll(now)` call from the
//! board's main loop or the host simulator. Samples every `sample_period_ms`; config documents
//! arriving on `sensors/<id>/config` change the thresholds and are reported on the status topic.

use crate::client::{BadIdentity, Client, ClientConfig, ConfigReport, Incoming, Transport};
use crate::config;
use crate::detector::{Detection, Detector, ThresholdError, Thresholds};
use crate::event::Event;
use crate::sensor::Sensor;

/// Everything a device needs at boot.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig<'a> {
    pub id: &'a str,
    /// Boot counter: increases on every start, so `(id, boot, seq)` is unique.
    pub boot: u32,
    pub sensor_name: &'a str,
    pub sample_period_ms: u32,
    pub thresholds: Thresholds,
    pub client: ClientConfig,
}

/// Why a device could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeviceError {
    Identity,
    Thresholds(ThresholdError),
}

/// What one `poll` did, for the caller's log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Activity {
    /// An event was queued (with this seq).
    pub event: Option<(u32, Detection)>,
    /// A config document arrived: `Ok` if applied.
    pub config: Option<Result<Thresholds, &'static str>>,
    /// The sensor failed to read.
    pub sensor_error: bool,
}

pub struct Device<S: Sensor, T: Transport, const N: usize> {
    sensor: S,
    detector: Detector,
    client: Client<T, N>,
    seq: u32,
    sample_period_ms: u32,
    next_sample: Option<u32>,
    sensor_errors: u32,
    sampling: bool,
}

impl<S: Sensor, T: Transport, const N: usize> Device<S, T, N> {
    pub fn new(sensor: S, transport: T, cfg: &DeviceConfig<'_>) -> Result<Self, DeviceError> {
        let detector = Detector::new(cfg.thresholds).map_err(DeviceError::Thresholds)?;
        let client = Client::new(transport, cfg.id, cfg.boot, cfg.sensor_name, cfg.client)
            .map_err(|BadIdentity| DeviceError::Identity)?;
        Ok(Self {
            sensor,
            detector,
            client,
            seq: 0,
            sample_period_ms: cfg.sample_period_ms.max(1),
            next_sample: None,
            sensor_errors: 0,
            sampling: true,
        })
    }

    pub fn client(&self) -> &Client<T, N> {
        &self.client
    }
    pub fn client_mut(&mut self) -> &mut Client<T, N> {
        &mut self.client
    }
    pub fn thresholds(&self) -> Thresholds {
        self.detector.thresholds()
    }
    /// Events created so far (the next seq).
    pub fn events_created(&self) -> u32 {
        self.seq
    }
    pub fn sensor_errors(&self) -> u32 {
        self.sensor_errors
    }

    /// Stops (or resumes) sampling; the client keeps running, e.g. to drain the outbox.
    pub fn set_sampling(&mut self, on: bool) {
        self.sampling = on;
    }

    /// Takes a sample when one is due, then runs the client.
    pub fn poll(&mut self, now: u32) -> Activity {
        let mut act = Activity::default();
        let due = self.sampling
            && match self.next_sample {
                None => true,
                Some(t) => (now.wrapping_sub(t) as i32) >= 0,
            };
        if due {
            self.next_sample = Some(now.wrapping_add(self.sample_period_ms));
            match self.sensor.read() {
                Ok(v) => {
                    if let Some(d) = self.detector.update(v, now) {
                        let seq = self.seq;
                        self.seq = self.seq.wrapping_add(1);
                        self.client.enqueue(Event {
                            seq,
                            value: d.value,
                            threshold: d.threshold,
                            direction: d.direction,
                            dropped: 0,
                        });
                        act.event = Some((seq, d));
                    }
                }
                Err(_) => {
                    self.sensor_errors = self.sensor_errors.saturating_add(1);
                    act.sensor_error = true;
                }
            }
        }
        let outcome = match self.client.poll(now) {
            // An empty retained payload means the document was deleted: keep what we have.
            Some(Incoming::Config(b"")) => None,
            Some(Incoming::Config(doc)) => Some(config::parse(doc, self.detector.thresholds())),
            None => None,
        };
        if let Some(r) = outcome {
            let applied = r.map_err(|e| e.as_str()).and_then(|t| {
                self.detector
                    .set_thresholds(t)
                    .map(|()| t)
                    .map_err(|e| e.as_str())
            });
            self.client.report_config(match applied {
                Ok(_) => ConfigReport::Applied,
                Err(why) => ConfigReport::Rejected(why),
            });
            act.config = Some(applied);
        }
        act
    }
}
