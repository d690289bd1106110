//! Printing results: an aligned table, or one JSON object per line.

use serde_json::{json, Value};

use super::broker::Broker;
use super::engine::SideResult;
use super::{Plan, Shape, Transport};

/// Both sides of one shape.
#[derive(Debug, Clone)]
pub(crate) struct ShapeResult {
    pub(crate) plan: Plan,
    pub(crate) busway: SideResult,
    pub(crate) raw: SideResult,
    /// Further baselines measured in the same run, by name (in memory: the in-runtime
    /// channels into one subscriber).
    pub(crate) others: Vec<(String, SideResult)>,
}

impl ShapeResult {
    /// busway msgs/s over raw msgs/s (1.0 = as fast as the raw client); `None` when either
    /// side lost messages.
    pub(crate) fn ratio(&self) -> Option<f64> {
        Some(self.busway.rate()? / self.raw.rate()?)
    }

    /// busway msgs/s over the best of the further baselines' (in memory: the fastest
    /// in-runtime channel); `None` without them or when a side lost messages.
    pub(crate) fn in_runtime_ratio(&self) -> Option<f64> {
        let best = self
            .others
            .iter()
            .map(|(_, s)| s.rate())
            .collect::<Option<Vec<f64>>>()?
            .into_iter()
            .reduce(f64::max)?;
        Some(self.busway.rate()? / best)
    }

    /// A short name of the raw side, for charts.
    pub(crate) fn raw_label(&self) -> &'static str {
        match (self.plan.transport, self.plan.shape) {
            (Transport::Memory, Shape::Pubsub | Shape::Fanin) => "crossbeam threads",
            (Transport::Memory, Shape::Latency) if self.plan.subscribers == 1 => "tokio mpsc",
            (Transport::Memory, _) => "tokio broadcast",
            (Transport::Redis, _) => "redis-rs",
            (Transport::Nats, _) => "async-nats",
        }
    }

    /// The ratio the shape is judged by: p99 for `latency`, throughput for the others.
    pub(crate) fn headline_ratio(&self) -> Option<f64> {
        match self.plan.shape {
            Shape::Latency => self.p99_ratio(),
            _ => self.ratio(),
        }
    }

    /// busway p99 over raw p99 (latency shape; 1.0 = as fast as the raw client).
    pub(crate) fn p99_ratio(&self) -> Option<f64> {
        let b = self.busway.latency?;
        let r = self.raw.latency?;
        (self.busway.lost == 0 && self.raw.lost == 0 && r.p99_us > 0.0).then(|| b.p99_us / r.p99_us)
    }

    pub(crate) fn to_json(&self) -> Value {
        let p = &self.plan;
        json!({
            "transport": p.transport.as_str(),
            "mode": p.mode.to_string(),
            "shape": p.shape.as_str(),
            "payload_bytes": p.payload,
            "publishers": p.publishers,
            "subscribers": p.subscribers,
            "inflight": p.inflight,
            "rate": p.rate,
            "busway": side_json(&self.busway),
            "raw": side_json(&self.raw),
            "baselines": self.others.iter().map(|(name, s)| {
                let mut v = side_json(s);
                v["name"] = json!(name);
                v
            }).collect::<Vec<_>>(),
            "ratio": self.ratio(),
            "in_runtime_ratio": self.in_runtime_ratio(),
            "p99_ratio": self.p99_ratio(),
        })
    }
}

fn side_json(s: &SideResult) -> Value {
    let elapsed = s.elapsed.as_secs_f64();
    json!({
        "what": s.what,
        "published": s.published,
        "expected_deliveries": s.expected,
        "delivered": s.delivered,
        "lost": s.lost,
        "bus_dropped": s.bus_dropped,
        "errors": s.errors,
        "elapsed_s": elapsed,
        "msgs_per_s": s.rate(),
        "deliveries_per_s": s.rate().map(|_| s.delivered as f64 / elapsed),
        "broker_cpu_s": s.broker_cpu_s,
        "broker_cpu_s_per_million": s.cpu_per_million(),
        "client_cpu_s": s.client_cpu_s,
        "client_cpu_us_per_msg": s.client_us_per_msg(),
        "p50_us": s.latency.map(|l| l.p50_us),
        "p99_us": s.latency.map(|l| l.p99_us),
        "p999_us": s.latency.map(|l| l.p999_us),
        "max_us": s.latency.map(|l| l.max_us),
        "latency_samples": s.latency.map(|l| l.samples),
    })
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
}

/// Prints results as they come and remembers which lost messages.
#[derive(Debug)]
pub(crate) struct Report {
    format: Format,
    broker: String,
    header_done: bool,
    lossy: Vec<String>,
    legend: Vec<String>,
}

impl Report {
    pub(crate) fn new(format: Format, broker: &Broker) -> Report {
        Report {
            format,
            broker: broker.describe(),
            header_done: false,
            lossy: Vec::new(),
            legend: Vec::new(),
        }
    }

    pub(crate) fn print(&mut self, r: &ShapeResult) {
        let sides = [("busway", &r.busway), ("raw", &r.raw)]
            .into_iter()
            .chain(r.others.iter().map(|(name, s)| (name.as_str(), s)));
        for (side, s) in sides {
            if s.lost > 0 || s.errors > 0 {
                let counted = match s.bus_dropped {
                    Some(d) => format!(", {d} counted as dropped by the bus"),
                    None => String::new(),
                };
                self.lossy.push(format!(
                    "{}/{side} ({} of {} deliveries missing, {} errors{counted})",
                    r.plan.shape.as_str(),
                    s.lost,
                    s.expected,
                    s.errors
                ));
            }
        }
        match self.format {
            Format::Json => println!("{}", r.to_json()),
            Format::Table => self.print_rows(r),
        }
    }

    fn print_rows(&mut self, r: &ShapeResult) {
        let p = &r.plan;
        if !self.header_done {
            self.header_done = true;
            println!(
                "busway bench: transport={} mode={} payload={}B inflight={} broker: {}",
                p.transport.as_str(),
                p.mode,
                p.payload,
                p.inflight,
                self.broker
            );
            println!(
                "{:<8} {:<10} {:>5} {:>12} {:>12} {:>21} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                "shape",
                "side",
                "p/s",
                "msgs/s",
                "deliv/s",
                "delivered/expected",
                "p50 us",
                "p99 us",
                "p99.9 us",
                "cpu s/M",
                "cli us/m",
                "ratio"
            );
        }
        let sides = [("busway", &r.busway), ("raw", &r.raw)]
            .into_iter()
            .chain(r.others.iter().map(|(name, s)| (name.as_str(), s)));
        for (i, (side, s)) in sides.enumerate() {
            let suffix = if p.shape == Shape::Latency { "p99" } else { "" };
            let ratio = match i {
                0 => r.headline_ratio().map(|x| format!("{x:.2}{suffix}")),
                1 => Some(String::new()),
                // A further baseline's row: busway against it.
                _ => r
                    .busway
                    .rate()
                    .zip(s.rate())
                    .map(|(b, o)| format!("{:.2}", b / o)),
            };
            let num = |v: Option<f64>, prec: usize| match v {
                Some(v) => format!("{v:.prec$}"),
                None => "n/a".to_string(),
            };
            let rate = match s.rate() {
                Some(v) => format!("{v:.0}"),
                None if s.lost > 0 || s.errors > 0 => "LOST".to_string(),
                None => "n/a".to_string(),
            };
            println!(
                "{:<8} {:<10} {:>5} {:>12} {:>12} {:>21} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
                p.shape.as_str(),
                side,
                format!("{}/{}", p.publishers, p.subscribers),
                rate,
                num(
                    s.rate()
                        .map(|_| s.delivered as f64 / s.elapsed.as_secs_f64()),
                    0
                ),
                format!("{}/{}", s.delivered, s.expected),
                num(s.latency.map(|l| l.p50_us), 1),
                num(s.latency.map(|l| l.p99_us), 1),
                num(s.latency.map(|l| l.p999_us), 1),
                num(s.cpu_per_million(), 2),
                num(s.client_us_per_msg(), 2),
                ratio.unwrap_or_else(|| "n/a".to_string()),
            );
            let legend = format!("{} {side}: {}", p.shape.as_str(), s.what);
            if !self.legend.contains(&legend) {
                self.legend.push(legend);
            }
        }
    }

    /// Per shape, the median of the repeated runs' ratios, with their range (`--repeat`).
    pub(crate) fn medians(&mut self, results: &[ShapeResult]) {
        let mut shapes: Vec<Shape> = results.iter().map(|r| r.plan.shape).collect();
        shapes.dedup();
        if self.format == Format::Table {
            println!();
            println!(
                "{:<8} {:>5} {:>14} {:>16} {:>22} {:>24}",
                "shape",
                "runs",
                "median ratio",
                "min - max",
                "median cli us/m b / r",
                "vs in-runtime: median"
            );
        }
        for shape in shapes {
            let runs: Vec<&ShapeResult> =
                results.iter().filter(|r| r.plan.shape == shape).collect();
            let ratios: Vec<f64> = runs.iter().filter_map(|r| r.headline_ratio()).collect();
            let cli = |side: fn(&ShapeResult) -> &SideResult| {
                median(
                    runs.iter()
                        .filter_map(|r| side(r).client_us_per_msg())
                        .collect(),
                )
            };
            let (busway_cli, raw_cli) = (cli(|r| &r.busway), cli(|r| &r.raw));
            let spread = median_range(ratios.clone());
            let med = spread.map(|(m, _, _)| m);
            let fair: Vec<f64> = runs.iter().filter_map(|r| r.in_runtime_ratio()).collect();
            let fair_spread = median_range(fair.clone());
            match self.format {
                Format::Json => println!(
                    "{}",
                    json!({
                        "shape": shape.as_str(),
                        "runs": runs.len(),
                        "ratios": ratios,
                        "median_ratio": med,
                        "median_client_cpu_us_per_msg": { "busway": busway_cli, "raw": raw_cli },
                        "in_runtime_ratios": fair,
                        "median_in_runtime_ratio": fair_spread.map(|(m, _, _)| m),
                    })
                ),
                Format::Table => {
                    let num = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.2}"));
                    let suffix = if shape == Shape::Latency { "p99" } else { "" };
                    println!(
                        "{:<8} {:>5} {:>14} {:>16} {:>22} {:>24}",
                        shape.as_str(),
                        runs.len(),
                        format!("{}{suffix}", num(med)),
                        spread.map_or("n/a".to_string(), |(_, lo, hi)| {
                            format!("{lo:.2} - {hi:.2}")
                        }),
                        format!("{} / {}", num(busway_cli), num(raw_cli)),
                        fair_spread.map_or(String::new(), |(m, lo, hi)| {
                            format!("{m:.2} ({lo:.2} - {hi:.2})")
                        }),
                    );
                }
            }
        }
    }

    /// Ends the report: the table's legend (what each side was).
    pub(crate) fn finish(&mut self) {
        if self.format == Format::Table && !self.legend.is_empty() {
            println!();
            println!("ratio = busway msgs/s / raw msgs/s (latency: busway p99 / raw p99; on a further baseline's row: busway msgs/s / that baseline's; vs in-runtime = busway / the fastest of them); cpu s/M = broker CPU seconds per million published messages; cli us/m = this process's CPU microseconds per published message (client cost, both sides' own)");
            for l in self.legend.drain(..) {
                println!("  {l}");
            }
        }
    }

    /// The sides that lost messages or saw errors.
    pub(crate) fn lossy(&self) -> &[String] {
        &self.lossy
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The median, least and greatest of `values`; `None` when there is none.
pub(crate) fn median_range(values: Vec<f64>) -> Option<(f64, f64, f64)> {
    let least = values.iter().copied().reduce(f64::min)?;
    let greatest = values.iter().copied().reduce(f64::max)?;
    Some((median(values)?, least, greatest))
}
