//! Result records (one JSON line per run) and the comparison tables built from them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a result record is about; every command that writes one takes these flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Labels {
    /// Scenario name written into the result record (e.g. s1-qos1).
    #[arg(long, default_value = "adhoc")]
    pub scenario: String,
    /// Broker name written into the result record (waystation, mosquitto, rumqttd, ...).
    #[arg(long, default_value = "broker")]
    pub broker: String,
    #[arg(long, default_value_t = 1)]
    pub round: u32,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub scenario: String,
    pub broker: String,
    pub round: u32,
    pub values: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Record {
    pub fn new(l: &Labels) -> Self {
        Record {
            scenario: l.scenario.clone(),
            broker: l.broker.clone(),
            round: l.round,
            values: BTreeMap::new(),
            errors: Vec::new(),
        }
    }

    /// Prints a one-line summary on stderr and appends the JSON line to `out`.
    pub fn emit(&self, out: Option<&Path>) -> Result<()> {
        let mut line = format!("[{} {} r{}]", self.scenario, self.broker, self.round);
        for (k, v) in &self.values {
            line.push_str(&format!(" {k}={}", fmt_num(*v)));
        }
        for e in &self.errors {
            line.push_str(&format!(" ERROR: {e}"));
        }
        eprintln!("{line}");
        let json = serde_json::to_string(self)?;
        println!("{json}");
        if let Some(path) = out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?;
            writeln!(f, "{json}")?;
        }
        Ok(())
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct RecordArgs {
    /// key=value pairs (numbers).
    #[arg(long = "set", value_parser = parse_kv)]
    pub set: Vec<(String, f64)>,
    /// Start from the values and errors of the last record in this file (the stdout of a
    /// `wsbench run`), e.g. to add figures read from the broker after the run; --set wins.
    #[arg(long)]
    pub from: Option<PathBuf>,
    #[command(flatten)]
    pub labels: Labels,
}

fn parse_kv(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s.split_once('=').ok_or("expected key=value")?;
    Ok((
        k.to_string(),
        v.trim().parse::<f64>().map_err(|e| format!("{v}: {e}"))?,
    ))
}

pub fn record(a: RecordArgs) -> Result<()> {
    let mut r = Record::new(&a.labels);
    if let Some(path) = &a.from {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("no record in {}", path.display()))?;
        let from: Record = serde_json::from_str(line).context("parse the record")?;
        r.values = from.values;
        r.errors = from.errors;
    }
    r.values.extend(a.set);
    r.emit(a.labels.out.as_deref())
}

#[derive(clap::Args, Clone, Debug)]
pub struct TableArgs {
    /// JSON lines written by --out.
    #[arg(long = "in")]
    pub input: PathBuf,
    #[arg(long)]
    pub scenario: String,
    /// Comma-separated `key[:label[:median|sum|max]]`.
    #[arg(long)]
    pub metrics: String,
    #[arg(long)]
    pub title: Option<String>,
    /// The broker the ratios are relative to.
    #[arg(long, default_value = "waystation")]
    pub baseline: String,
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            format!("-{out}")
        } else {
            out
        }
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn table(a: TableArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.input).with_context(|| format!("read {}", a.input.display()))?;
    let recs: Vec<Record> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Record| r.scenario == a.scenario)
        .collect();
    let mut brokers: Vec<String> = Vec::new();
    for r in &recs {
        if !brokers.contains(&r.broker) {
            brokers.push(r.broker.clone());
        }
    }
    brokers.sort_by_key(|b| (b != &a.baseline, brokers_order(b)));
    let metrics: Vec<(String, String, String)> = a
        .metrics
        .split(',')
        .map(|m| {
            let mut it = m.split(':');
            let key = it.next().unwrap_or_default().to_string();
            let label = it.next().map(str::to_string).unwrap_or_else(|| key.clone());
            let agg = it.next().unwrap_or("median").to_string();
            (key, label, agg)
        })
        .collect();
    let stat = |broker: &str, key: &str, agg: &str| -> Option<(f64, f64, f64, usize)> {
        let mut v: Vec<f64> = recs
            .iter()
            .filter(|r| r.broker == broker)
            .filter_map(|r| r.values.get(key).copied())
            .collect();
        if v.is_empty() {
            return None;
        }
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let n = v.len();
        let m = match agg {
            "sum" => v.iter().sum(),
            "max" => hi,
            _ => median(&mut v),
        };
        Some((m, lo, hi, n))
    };
    if let Some(t) = &a.title {
        println!("#### {t}\n");
    }
    let mut head = "| broker | runs |".to_string();
    let mut sep = "|---|---|".to_string();
    for (_, label, agg) in &metrics {
        let what = match agg.as_str() {
            "sum" => "total",
            "max" => "max",
            _ => "median (min-max)",
        };
        head.push_str(&format!(" {label}, {what} | ratio |"));
        sep.push_str("---|---|");
    }
    println!("{head}\n{sep}");
    for b in &brokers {
        let runs = recs.iter().filter(|r| &r.broker == b).count();
        let mut row = format!("| {b} | {runs} |");
        for (key, _, agg) in &metrics {
            match stat(b, key, agg) {
                None => row.push_str(" - | - |"),
                Some((m, lo, hi, n)) => {
                    let cell = if n > 1 && agg == "median" {
                        format!("{} ({}-{})", fmt_num(m), fmt_num(lo), fmt_num(hi))
                    } else {
                        fmt_num(m)
                    };
                    let ratio = match stat(&a.baseline, key, agg) {
                        Some((base, ..)) if base != 0.0 => format!("{:.2}x", m / base),
                        _ => "-".into(),
                    };
                    row.push_str(&format!(" {cell} | {ratio} |"));
                }
            }
        }
        println!("{row}");
    }
    let errors: Vec<&Record> = recs.iter().filter(|r| !r.errors.is_empty()).collect();
    for r in errors {
        println!(
            "\n- {} round {}: {}",
            r.broker,
            r.round,
            r.errors.join("; ")
        );
    }
    println!();
    Ok(())
}

fn brokers_order(b: &str) -> usize {
    ["waystation", "mosquitto", "rumqttd"]
        .iter()
        .position(|x| b.starts_with(x))
        .unwrap_or(9)
}
