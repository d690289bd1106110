//! `busway-bench`: one transport, mode and shape at a time, measured through busway and, in
//! the same run on the same broker, through the raw client doing the same work; or
//! (`busway-bench scenario`) the platform's traffic before and after the dual bus.
//!
//! Every side publishes the same number of messages with the same payload size and the same
//! number of publishes in flight; every subscriber must receive every message. A side that
//! loses messages reports the loss and no rate, and the command fails.

mod broker;
mod engine;
mod plot;
mod progress;
mod raw_memory;
mod raw_nats;
mod raw_redis;
mod report;
mod scenario;
mod side_busway;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use busway::{Error, ErrorKind, Mode, Result};
use clap::{Parser, ValueEnum};

use broker::Broker;
use engine::SideResult;
use progress::Progress;
use report::{Format, Report, ShapeResult};

/// Measure a transport beside its raw client on the same broker, in the same run; or
/// (`scenario`) the platform's traffic before and after the dual bus.
#[derive(Debug, Clone, Parser)]
#[command(name = "busway-bench", version, args_conflicts_with_subcommands = true)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Transport to measure.
    #[arg(long, value_enum, default_value_t = Transport::Memory)]
    transport: Transport,
    /// Bus mode: broadcast (pub/sub) or stream (durable, acked).
    #[arg(long, value_enum, default_value_t = ModeArg::Broadcast)]
    mode: ModeArg,
    /// Traffic shape; `all` runs every shape in turn.
    #[arg(long, value_enum, default_value_t = ShapeArg::All)]
    shape: ShapeArg,
    /// Payload size in bytes (at least 8 for `latency`: the send time travels in it).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages to publish per side (split between publishers).
    #[arg(long, default_value_t = 200_000, conflicts_with = "seconds")]
    count: u64,
    /// Publish for this many seconds per side instead of a fixed count.
    #[arg(long)]
    seconds: Option<f64>,
    /// Messages per second for the `latency` shape, which publishes `--count` messages but at
    /// most ten seconds' worth (or for `--seconds`).
    #[arg(long, default_value_t = 5_000.0)]
    rate: f64,
    /// Publishers (`publish` default 1, `fanin` default 7, `latency` default 1; the rate is
    /// shared between them).
    #[arg(long)]
    publishers: Option<usize>,
    /// Subscribers for the `fanout` shape (default 7) and the `latency` shape (default 1;
    /// each gets every message, and the percentiles are over all their deliveries).
    #[arg(long)]
    subscribers: Option<usize>,
    /// Publishes in flight per publisher, on both sides (default 256 on brokers, 1 in memory).
    #[arg(long)]
    inflight: Option<usize>,
    /// Broker URL; by default a private broker is started on a free loopback port.
    #[arg(long)]
    url: Option<String>,
    /// The busway side publishes and subscribes through a Router holding the bus (one bus,
    /// every topic routed to it), as engines do.
    #[arg(long)]
    router: bool,
    /// With --router: busway's metrics on (a Prometheus recorder installed, latency
    /// histograms sampled at the default rate), to measure their cost.
    #[arg(long, requires = "router")]
    metrics: bool,
    /// With --transport nats --mode stream: the raw side sends a unique `Nats-Msg-Id` with
    /// each publish, as busway does, so the server's duplicate tracking costs both sides.
    #[arg(long)]
    raw_msg_id: bool,
    /// With --transport nats: a private 3-node cluster instead of one server, JetStream
    /// streams replicated on all three (R3) on both sides.
    #[arg(long, conflicts_with = "url")]
    nats_cluster: bool,
    /// With --transport redis: a private Sentinel set (primary, one replica, 3 sentinels);
    /// busway connects through the sentinels (`redis+sentinel://`), the raw client to the
    /// primary.
    #[arg(long, conflicts_with_all = ["url", "nats_cluster"])]
    redis_sentinel: bool,
    /// With --transport redis --mode stream: busway's `min_replicas` (each pipeline of XADDs
    /// ends with `WAIT N`); the raw side does not wait.
    #[arg(long, default_value_t = 0)]
    min_replicas: u32,
    /// Measure each shape this many times (busway first, then the raw client first, in
    /// turn) and end with the median ratio per shape: single runs on a shared machine swing
    /// by tens of percent.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write SVG charts into this directory: throughput per shape and side (median,
    /// range and each run) and the latency shape's percentile curves.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum BenchCommand {
    /// The seven-engine platform's traffic in three set-ups: the one-Redis design, the dual
    /// bus on two more Redis servers, and both buses on NATS; broker CPU, connections and
    /// end-to-end latency of each.
    Scenario(scenario::ScenarioArgs),
}

/// Which transport is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Transport {
    /// In-process MemoryBus; raw: crossbeam / tokio channels.
    Memory,
    /// busway-redis; raw: redis-rs.
    Redis,
    /// busway-nats; raw: async-nats.
    Nats,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Memory => "memory",
            Transport::Redis => "redis",
            Transport::Nats => "nats",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Broadcast,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ShapeArg {
    Publish,
    Pubsub,
    Fanout,
    Fanin,
    Latency,
    All,
}

/// One traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Publishers only, nobody subscribed.
    Publish,
    /// One publisher, one subscriber.
    Pubsub,
    /// One publisher, several subscribers each receiving everything.
    Fanout,
    /// Several publishers, one subscriber.
    Fanin,
    /// Publishers at a fixed total rate, subscribers measuring delay (one and one unless
    /// `--publishers` / `--subscribers` say otherwise).
    Latency,
}

impl Shape {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Shape::Publish => "publish",
            Shape::Pubsub => "pubsub",
            Shape::Fanout => "fanout",
            Shape::Fanin => "fanin",
            Shape::Latency => "latency",
        }
    }
}

/// Everything one side of one shape needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) transport: Transport,
    pub(crate) mode: Mode,
    pub(crate) shape: Shape,
    pub(crate) payload: usize,
    /// Messages to publish in total (ignored when `seconds` is set).
    pub(crate) count: u64,
    pub(crate) seconds: Option<Duration>,
    /// Paced publishing (latency shape only).
    pub(crate) rate: Option<f64>,
    pub(crate) publishers: usize,
    pub(crate) subscribers: usize,
    pub(crate) inflight: usize,
    /// The raw JetStream side sends a `Nats-Msg-Id` per publish (`--raw-msg-id`).
    pub(crate) raw_msg_id: bool,
    /// The busway side goes through a Router (`--router`).
    pub(crate) router: bool,
    /// busway-redis `min_replicas` (stream mode).
    pub(crate) min_replicas: u32,
    /// A token unique to this run, so topics, keys and streams never meet earlier runs'.
    pub(crate) run_id: String,
}

impl Plan {
    /// Whether payloads carry their send time (and subscribers record delays).
    pub(crate) fn timed(&self) -> bool {
        self.shape == Shape::Latency
    }

    /// The topic (busway) or channel / subject / stream key (raw) of this shape. The sides
    /// differ in their first token, so a JetStream stream busway creates for `bench.>` never
    /// overlaps the raw side's.
    pub(crate) fn topic(&self, side: &str) -> String {
        format!("{side}bench.{}.{}", self.run_id, self.shape.as_str())
    }

    /// A subscriber's queue capacity: room for everything it may be sent, so nothing waits
    /// on a full queue longer than it must and nothing can be dropped.
    pub(crate) fn queue_capacity(&self) -> usize {
        match self.seconds {
            Some(_) => 1 << 20,
            None => (self.count as usize).clamp(1024, 1 << 20),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(BenchArgs::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("busway-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `busway-bench`.
///
/// # Errors
/// Bad options, a broker that cannot be started or reached, a failed publish, or any side that
/// lost messages (after printing every result).
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    if let Some(BenchCommand::Scenario(scenario)) = args.command {
        return scenario::run(scenario).await;
    }
    // Installed for the whole run; nothing scrapes it: the cost measured is recording.
    let _recorder = if args.metrics {
        Some(busway::metrics::install()?)
    } else {
        None
    };
    let shapes: Vec<Shape> = match args.shape {
        ShapeArg::Publish => vec![Shape::Publish],
        ShapeArg::Pubsub => vec![Shape::Pubsub],
        ShapeArg::Fanout => vec![Shape::Fanout],
        ShapeArg::Fanin => vec![Shape::Fanin],
        ShapeArg::Latency => vec![Shape::Latency],
        ShapeArg::All => vec![
            Shape::Publish,
            Shape::Pubsub,
            Shape::Fanout,
            Shape::Fanin,
            Shape::Latency,
        ],
    };
    if args.payload == 0 {
        return Err(Error::config("--payload must be at least 1 byte"));
    }
    if args.count == 0 {
        return Err(Error::config("--count must be at least 1"));
    }
    if let Some(s) = args.seconds {
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::config("--seconds must be a positive number"));
        }
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(Error::config("--rate must be a positive number"));
    }
    if args.publishers == Some(0)
        || args.subscribers == Some(0)
        || args.inflight == Some(0)
        || args.repeat == 0
    {
        return Err(Error::config(
            "--publishers, --subscribers, --inflight and --repeat must be at least 1",
        ));
    }
    let mode = match args.mode {
        ModeArg::Broadcast => Mode::Broadcast,
        ModeArg::Stream => Mode::Stream,
    };
    let broker = if args.nats_cluster {
        if args.transport != Transport::Nats {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "--nats-cluster needs --transport nats",
            ));
        }
        Broker::open_nats_cluster().await?
    } else if args.redis_sentinel {
        if args.transport != Transport::Redis {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "--redis-sentinel needs --transport redis",
            ));
        }
        Broker::open_redis_sentinel().await?
    } else {
        Broker::open(args.transport, args.url.as_deref()).await?
    };
    let format = if args.json {
        Format::Json
    } else {
        Format::Table
    };
    let mut report = Report::new(format, &broker);
    let run_id = busway::transport::new_message_id()[..8].to_string();
    let mut results = Vec::new();
    let progress = Progress::new((shapes.len() * args.repeat) as u64, args.json);
    for shape in shapes {
        for k in 0..args.repeat {
            progress.step(format!(
                "{} {} {}, run {} of {}",
                args.transport.as_str(),
                mode,
                shape.as_str(),
                k + 1,
                args.repeat
            ));
            // Each repetition on topics, keys and streams of its own.
            let plan = plan_for(&args, mode, shape, &format!("{run_id}r{k}"));
            // Odd repetitions run the raw side first: whichever side runs second finds the
            // process's heap already grown (and a backlog-heavy shape such as fan-in grows it
            // by ~100 MB), so alternating keeps that from favouring one side in the medians.
            let result = measure(&plan, &broker, k % 2 == 1).await?;
            progress.print(|| report.print(&result));
            progress.done(1);
            results.push(result);
        }
    }
    progress.finish();
    if args.repeat > 1 {
        report.medians(&results);
    }
    report.finish();
    if let Some(dir) = &args.plot {
        for path in plot::bench_charts(dir, &results)? {
            if !args.json {
                println!("chart: {}", path.display());
            }
        }
    }
    let lost = report.lossy();
    if !lost.is_empty() {
        return Err(Error::new(
            ErrorKind::Other,
            format!("messages were lost in: {}", lost.join(", ")),
        ));
    }
    Ok(())
}

fn plan_for(args: &BenchArgs, mode: Mode, shape: Shape, run_id: &str) -> Plan {
    let (publishers, subscribers) = match shape {
        Shape::Publish => (args.publishers.unwrap_or(1), 0),
        Shape::Pubsub => (1, 1),
        Shape::Latency => (args.publishers.unwrap_or(1), args.subscribers.unwrap_or(1)),
        Shape::Fanout => (1, args.subscribers.unwrap_or(7)),
        Shape::Fanin => (args.publishers.unwrap_or(7), 1),
    };
    let default_inflight = match args.transport {
        Transport::Memory => 1,
        Transport::Redis | Transport::Nats => 256,
    };
    let latency = shape == Shape::Latency;
    Plan {
        transport: args.transport,
        mode,
        shape,
        payload: if latency {
            args.payload.max(8)
        } else {
            args.payload
        },
        count: if latency {
            args.count.min((args.rate * 10.0) as u64).max(1)
        } else {
            args.count
        },
        seconds: args.seconds.map(Duration::from_secs_f64),
        rate: latency.then_some(args.rate),
        publishers,
        min_replicas: args.min_replicas,
        subscribers,
        inflight: args.inflight.unwrap_or(default_inflight),
        raw_msg_id: args.raw_msg_id,
        router: args.router,
        run_id: run_id.to_string(),
    }
}

/// Runs one shape on both sides, on the same broker: busway first, then the raw client, or
/// the other way round with `raw_first`.
///
/// On a broker, an untimed warm-up of a tenth of the work (the raw client, on topics of its
/// own) comes first: a fresh server grows its memory and buffers during the first run it
/// serves, which cost whichever side ran first up to a third of its throughput.
async fn measure(plan: &Plan, broker: &Broker, raw_first: bool) -> Result<ShapeResult> {
    if plan.transport != Transport::Memory {
        let warm = Plan {
            count: (plan.count / 10).max(1),
            seconds: plan.seconds.map(|s| s / 10),
            run_id: format!("{}w", plan.run_id),
            ..plan.clone()
        };
        raw_side(&warm, broker).await?;
    }
    let (busway, raw, others) = if raw_first {
        let raw = raw_side(plan, broker).await?;
        let others = other_sides(plan).await?;
        (side_busway::run(plan, broker).await?, raw, others)
    } else {
        let busway = side_busway::run(plan, broker).await?;
        (
            busway,
            raw_side(plan, broker).await?,
            other_sides(plan).await?,
        )
    };
    Ok(ShapeResult {
        plan: plan.clone(),
        busway,
        raw,
        others,
    })
}

/// The further baselines of `plan` (in memory, into one subscriber: the in-runtime channels).
async fn other_sides(plan: &Plan) -> Result<Vec<(String, SideResult)>> {
    match plan.transport {
        Transport::Memory => raw_memory::in_runtime(plan).await,
        Transport::Redis | Transport::Nats => Ok(Vec::new()),
    }
}

/// The raw client doing `plan`'s work.
async fn raw_side(plan: &Plan, broker: &Broker) -> Result<SideResult> {
    match plan.transport {
        Transport::Memory => raw_memory::run(plan).await,
        Transport::Redis => raw_redis::run(plan, broker).await,
        Transport::Nats => raw_nats::run(plan, broker).await,
    }
}
