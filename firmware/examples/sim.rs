//! `cargo run -p waystation-firmware --features std --example sim -- HOST:PORT [SENSORS] [RATE] [SECONDS]`
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use waystation_firmware::sim::{run, SimOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = SimOptions {
        broker: args
            .first()
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:1883".into()),
        sensors: args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4),
        rate_hz: args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0),
        duration: args
            .get(3)
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs_f64),
        ..SimOptions::default()
    };
    match run(&opts, &AtomicBool::new(false)) {
        Ok(r) => println!("{r}"),
        Err(e) => {
            eprintln!("sim: {e}");
            std::process::exit(2);
        }
    }
}
