//! `busway-bench scenario`: the seven-engine platform's traffic on private local brokers, in
//! three set-ups, and what each costs the brokers.
//!
//! - **before**: the one-Redis design. Every process (the market-data feed and seven engines)
//!   holds three connections to one main Redis (publish, read, state); every message is an
//!   `XADD ... MAXLEN ~ 100000` awaited on its own; every consumer polls `XREADGROUP ... COUNT
//!   50 BLOCK 1000` one stream at a time, `XACK`s each entry and sleeps 1 ms between rounds.
//! - **dual bus**: each process builds a busway `Router` from a routing table sending
//!   `marketdata.>` to one Redis (broadcast) and `engine.>` to a second Redis (stream mode);
//!   the main Redis is running and carries nothing from engines.
//! - **off Redis**: the same routing table with market data on core NATS and engine logic on
//!   JetStream (one nats-server each).
//!
//! Every process is a set of tasks in this one process with its own connections, as separate
//! processes would hold them; end-to-end latency comes from the send time in each payload.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busway::{
    Bus, Config, Message, Overflow, Pattern, Registry, Result, Router, SubscribeOptions, Topic,
};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::AsyncConnectionConfig;
use serde_json::json;

use super::broker::Broker;
use super::engine::{client_err, now_ns, sent_ns};
use super::plot::SetupFigures;
use super::progress::Progress;
use super::report::median_range;
use super::Transport;

/// The seven engines of the platform.
const ENGINES: [&str; 7] = [
    "portfolio",
    "collateral",
    "ml",
    "factor",
    "strategy",
    "websocket",
    "features",
];
/// Engines that consume every quote and trade.
const MD_SUBSCRIBERS: [&str; 5] = ["strategy", "features", "websocket", "portfolio", "factor"];
/// Engine-to-engine logic flows: (consumer, producer). Every engine publishes its own logic
/// topic; these are the ones somebody reads.
const LOGIC: [(&str, &str); 7] = [
    ("ml", "features"),
    ("strategy", "ml"),
    ("strategy", "factor"),
    ("portfolio", "strategy"),
    ("collateral", "portfolio"),
    ("websocket", "portfolio"),
    ("websocket", "strategy"),
];
/// The market-data feed plus the engines: the processes that hold connections.
const PROCESSES: usize = ENGINES.len() + 1;

/// Options of `busway-bench scenario`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScenarioArgs {
    /// Set-ups to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Setup::Before, Setup::DualBus, Setup::OffRedis])]
    setups: Vec<Setup>,
    /// Symbols in the market-data feed.
    #[arg(long, default_value_t = 20)]
    symbols: usize,
    /// Market-data messages per second (one in five a trade, the rest quotes).
    #[arg(long, default_value_t = 1000.0)]
    md_rate: f64,
    /// Market-data messages the feed publishes together at each tick, as a feed handler
    /// passes on one exchange packet (1: evenly spaced). busway publishes a tick's messages
    /// concurrently, so they share round trips; the one-Redis design awaits one XADD each.
    #[arg(long, default_value_t = 1)]
    md_burst: u64,
    /// Logic messages per second published by each engine.
    #[arg(long, default_value_t = 20.0)]
    logic_rate: f64,
    /// Seconds of traffic per set-up.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Payload bytes (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// At most this many seconds, after publishing stops, to wait for the last deliveries;
    /// what is not delivered by then is reported as missing.
    #[arg(long, default_value_t = 20.0)]
    drain: f64,
    /// Run the set-ups this many times and end with the median of each comparison: the
    /// one-Redis design's CPU per message moves by a third from run to run.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// One JSON object per line instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write `scenario.svg` into this directory: broker CPU per million messages and
    /// p99 per set-up (medians, range and each run, log scales).
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
}

/// One set-up of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Setup {
    /// One main Redis, streams polled one at a time, one round trip per message.
    Before,
    /// busway: market data and engine logic on two further Redis servers.
    DualBus,
    /// busway: market data on core NATS, engine logic on JetStream.
    OffRedis,
}

impl Setup {
    fn as_str(self) -> &'static str {
        match self {
            Setup::Before => "before",
            Setup::DualBus => "dual_bus",
            Setup::OffRedis => "off_redis",
        }
    }
}

/// Every delivery of a set-up: count and end-to-end delay, market data and logic apart.
#[derive(Debug)]
struct Sink {
    delivered: AtomicU64,
    errors: AtomicU64,
    md: Mutex<Histogram<u64>>,
    logic: Mutex<Histogram<u64>>,
}

fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds"))
}

impl Sink {
    fn new() -> Arc<Sink> {
        Arc::new(Sink {
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            md: histogram(),
            logic: histogram(),
        })
    }

    fn record(&self, payload: &[u8], md: bool) {
        let now = now_ns();
        let sent = sent_ns(payload, now);
        let hist = if md { &self.md } else { &self.logic };
        if let Ok(mut h) = hist.lock() {
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
        self.delivered.fetch_add(1, Relaxed);
    }
}

/// A payload stamped with its send time.
fn stamped(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64_le(now_ns());
    b.resize(size.max(8), 0x5a);
    b.freeze()
}

/// Sleeps until message `i` of a stream paced at `rate` per second is due; false once
/// `deadline` has passed.
async fn pace(
    began: tokio::time::Instant,
    rate: f64,
    i: u64,
    deadline: tokio::time::Instant,
) -> bool {
    let due = began + Duration::from_secs_f64(i as f64 / rate);
    if due >= deadline {
        return false;
    }
    tokio::time::sleep_until(due).await;
    true
}

/// One broker of a set-up and what it cost.
#[derive(Debug, Clone)]
struct BrokerFigures {
    role: &'static str,
    cpu_s: Option<f64>,
    /// Client connections from engines (the bench's own admin connection excluded).
    connections: Option<u64>,
}

/// The outcome of one set-up.
#[derive(Debug, Clone)]
struct Outcome {
    setup: Setup,
    published: u64,
    expected: u64,
    delivered: u64,
    errors: u64,
    delays: Delays,
    brokers: Vec<BrokerFigures>,
}

impl Outcome {
    fn total_cpu(&self) -> Option<f64> {
        self.brokers.iter().map(|b| b.cpu_s).sum()
    }

    fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.total_cpu()?;
        (self.published > 0).then(|| cpu * 1e6 / self.published as f64)
    }

    fn main(&self) -> &BrokerFigures {
        &self.brokers[0]
    }

    fn engine_connections(&self) -> u64 {
        self.brokers.iter().filter_map(|b| b.connections).sum()
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "setup": self.setup.as_str(),
            "published": self.published,
            "expected_deliveries": self.expected,
            "delivered": self.delivered,
            "errors": self.errors,
            "p50_us": self.delays.p50_us,
            "p99_us": self.delays.p99_us,
            "marketdata_p99_us": self.delays.md_p99_us,
            "logic_p99_us": self.delays.logic_p99_us,
            "brokers": self.brokers.iter().map(|b| json!({
                "role": b.role,
                "cpu_s": b.cpu_s,
                "connections": b.connections,
            })).collect::<Vec<_>>(),
            "total_broker_cpu_s": self.total_cpu(),
            "broker_cpu_s_per_million": self.cpu_per_million(),
            "engine_connections": self.engine_connections(),
            "connections_per_engine": self.engine_connections() as f64 / PROCESSES as f64,
        })
    }
}

/// The plan every set-up follows.
#[derive(Debug, Clone)]
struct Traffic {
    symbols: Vec<String>,
    md_rate: f64,
    md_burst: u64,
    logic_rate: f64,
    seconds: Duration,
    payload: usize,
    drain: Duration,
}

impl Traffic {
    /// Market-data message `i`: (is a trade, symbol).
    fn md(&self, i: u64) -> (bool, &str) {
        (i % 5 == 4, &self.symbols[(i as usize) % self.symbols.len()])
    }

    /// Sleeps until market-data message `i` is due (the first of its tick); false once
    /// `deadline` has passed.
    async fn md_due(
        &self,
        began: tokio::time::Instant,
        i: u64,
        deadline: tokio::time::Instant,
    ) -> bool {
        pace(began, self.md_rate, i - i % self.md_burst, deadline).await
    }

    fn md_subscriber(engine: &str) -> bool {
        MD_SUBSCRIBERS.contains(&engine)
    }

    fn producers_of(engine: &str) -> Vec<&'static str> {
        LOGIC
            .iter()
            .filter(|(c, _)| *c == engine)
            .map(|(_, p)| *p)
            .collect()
    }

    fn consumers_of(engine: &str) -> u64 {
        LOGIC.iter().filter(|(_, p)| *p == engine).count() as u64
    }

    /// Deliveries owed for what was published.
    fn expected(&self, md_published: u64, logic_published: &[(&str, u64)]) -> u64 {
        md_published * MD_SUBSCRIBERS.len() as u64
            + logic_published
                .iter()
                .map(|(e, n)| n * Self::consumers_of(e))
                .sum::<u64>()
    }
}

/// Runs `busway-bench scenario`.
///
/// # Errors
/// A broker that cannot be started or reached, or a failed publish or subscribe.
pub(crate) async fn run(args: ScenarioArgs) -> Result<()> {
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if args.symbols == 0
        || args.md_burst == 0
        || ![args.md_rate, args.logic_rate, args.seconds]
            .into_iter()
            .all(positive)
        || !(args.drain >= 0.0 && args.drain.is_finite())
        || args.repeat == 0
    {
        return Err(busway::Error::config(
            "--symbols, --md-rate, --md-burst, --logic-rate, --seconds and --repeat must be positive, --drain at least 0",
        ));
    }
    let traffic = Traffic {
        symbols: (0..args.symbols).map(|i| format!("SYM{i:03}")).collect(),
        md_rate: args.md_rate,
        md_burst: args.md_burst,
        logic_rate: args.logic_rate,
        seconds: Duration::from_secs_f64(args.seconds),
        payload: args.payload.max(8),
        drain: Duration::from_secs_f64(args.drain),
    };
    if !args.json {
        println!(
            "scenario: {} symbols, market data {} msgs/s in ticks of {}, logic {} msgs/s per engine, {} s per set-up",
            args.symbols, args.md_rate, args.md_burst, args.logic_rate, args.seconds
        );
    }
    let mut compared: Vec<Compared> = Vec::new();
    let mut figures: Vec<SetupFigures> = args
        .setups
        .iter()
        .map(|s| SetupFigures {
            setup: s.as_str().to_string(),
            cpu_per_million: Vec::new(),
            p99_us: Vec::new(),
        })
        .collect();
    let progress = Progress::new((args.repeat * args.setups.len()) as u64, args.json);
    for k in 0..args.repeat {
        let mut outcomes = Vec::new();
        for (i, setup) in args.setups.iter().enumerate() {
            progress.step(format!(
                "scenario {}, run {} of {}",
                setup.as_str(),
                k + 1,
                args.repeat
            ));
            let outcome = match setup {
                Setup::Before => before(&traffic).await?,
                Setup::DualBus => via_busway(&traffic, *setup, Transport::Redis).await?,
                Setup::OffRedis => via_busway(&traffic, *setup, Transport::Nats).await?,
            };
            progress.print(|| {
                if args.json {
                    println!("{}", outcome.to_json());
                } else {
                    print_outcome(&outcome);
                }
            });
            progress.done(1);
            figures[i].cpu_per_million.extend(outcome.cpu_per_million());
            figures[i].p99_us.extend(outcome.delays.p99_us);
            outcomes.push(outcome);
        }
        if let Some(base) = outcomes.iter().find(|o| o.setup == Setup::Before).cloned() {
            compared.extend(progress.print(|| compare(&base, &outcomes, args.json)));
        }
    }
    progress.finish();
    if args.repeat > 1 {
        print_medians(&args.setups, &compared, args.repeat, args.json);
    }
    if let Some(dir) = &args.plot {
        let title = format!(
            "busway-bench scenario: {} md/s in ticks of {}, {} logic/s per engine ({} runs)",
            args.md_rate, args.md_burst, args.logic_rate, args.repeat
        );
        let path = super::plot::scenario_chart(dir, &title, &figures)?;
        if !args.json {
            println!("chart: {}", path.display());
        }
    }
    Ok(())
}

/// One set-up's comparison with the one-Redis design in one run.
struct Compared {
    setup: Setup,
    cpu_x: Option<f64>,
    p99_x: Option<f64>,
}

/// Per set-up, the median over the runs of how many times less broker CPU per million
/// messages and how many times lower p99 than the one-Redis design.
fn print_medians(setups: &[Setup], compared: &[Compared], runs: usize, json: bool) {
    let per_setup = setups.iter().filter(|s| **s != Setup::Before).map(|setup| {
        let of = |pick: fn(&Compared) -> Option<f64>| {
            median_range(
                compared
                    .iter()
                    .filter(|c| c.setup == *setup)
                    .filter_map(pick)
                    .collect(),
            )
        };
        (setup, of(|c| c.cpu_x), of(|c| c.p99_x))
    });
    if json {
        for (setup, cpu_x, p99_x) in per_setup {
            let range = |v: Option<(f64, f64, f64)>| {
                v.map(|(m, lo, hi)| json!({"median": m, "min": lo, "max": hi}))
            };
            println!(
                "{}",
                json!({
                    "medians": setup.as_str(),
                    "versus": "before",
                    "runs": runs,
                    "broker_cpu_per_million_x_less": range(cpu_x),
                    "p99_x_lower": range(p99_x),
                })
            );
        }
        return;
    }
    println!();
    println!("== medians of {runs} runs, versus before");
    println!(
        "   {:<10} {:>26} {:>26}",
        "setup", "CPU/M msgs x less (range)", "p99 x lower (range)"
    );
    let cell = |v: Option<(f64, f64, f64)>| {
        v.map_or("n/a".to_string(), |(m, lo, hi)| {
            format!("{m:.1} ({lo:.1}-{hi:.1})")
        })
    };
    for (setup, cpu_x, p99_x) in per_setup {
        println!(
            "   {:<10} {:>26} {:>26}",
            setup.as_str(),
            cell(cpu_x),
            cell(p99_x)
        );
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.prec$}"))
}

fn print_outcome(o: &Outcome) {
    println!(
        "== {}: published {} delivered {}/{} errors {}  e2e p50 {} us  p99 {} us (market data p99 {} us, logic p99 {} us)",
        o.setup.as_str(),
        o.published,
        o.delivered,
        o.expected,
        o.errors,
        fmt_opt(o.delays.p50_us, 0),
        fmt_opt(o.delays.p99_us, 0),
        fmt_opt(o.delays.md_p99_us, 0),
        fmt_opt(o.delays.logic_p99_us, 0)
    );
    println!("   {:<20} {:>10} {:>12}", "broker", "cpu s", "connections");
    for b in &o.brokers {
        println!(
            "   {:<20} {:>10} {:>12}",
            b.role,
            fmt_opt(b.cpu_s, 3),
            b.connections.map_or("n/a".to_string(), |c| c.to_string())
        );
    }
    println!(
        "   broker CPU {} s per million engine messages; {} engine connections, {:.1} per process ({} processes)",
        fmt_opt(o.cpu_per_million(), 2),
        o.engine_connections(),
        o.engine_connections() as f64 / PROCESSES as f64,
        PROCESSES
    );
    println!();
}

/// Prints how each busway set-up of one run compares with the one-Redis design `base`, and
/// returns the figures.
fn compare(base: &Outcome, outcomes: &[Outcome], json: bool) -> Vec<Compared> {
    let rows: Vec<_> = outcomes
        .iter()
        .filter(|o| o.setup != Setup::Before)
        .map(|o| {
            let main_cut = base
                .main()
                .cpu_s
                .zip(o.main().cpu_s)
                .filter(|(b, _)| *b > 0.0)
                .map(|(b, x)| (b - x) / b * 100.0);
            let cpu_x = base
                .cpu_per_million()
                .zip(o.cpu_per_million())
                .filter(|(_, x)| *x > 0.0)
                .map(|(b, x)| b / x);
            let p99_x = base
                .delays
                .p99_us
                .zip(o.delays.p99_us)
                .filter(|(_, x)| *x > 0.0)
                .map(|(b, x)| b / x);
            (o, main_cut, cpu_x, p99_x)
        })
        .collect();
    let compared = rows
        .iter()
        .map(|(o, _, cpu_x, p99_x)| Compared {
            setup: o.setup,
            cpu_x: *cpu_x,
            p99_x: *p99_x,
        })
        .collect();
    if json {
        for (o, main_cut, cpu_x, p99_x) in &rows {
            println!(
                "{}",
                json!({
                    "compare": o.setup.as_str(),
                    "versus": "before",
                    "main_redis_cpu_reduction_pct": main_cut,
                    "main_redis_engine_connections": o.main().connections,
                    "broker_cpu_per_million_x_less": cpu_x,
                    "p99_x_lower": p99_x,
                })
            );
        }
        return compared;
    }
    println!("== versus before (targets: main Redis engine connections 0; broker CPU per million >= 10x less; p99 >= 10x lower)");
    println!(
        "   {:<10} {:>18} {:>18} {:>22} {:>14}",
        "setup", "main CPU cut %", "main engine conns", "CPU/M msgs x less", "p99 x lower"
    );
    for (o, main_cut, cpu_x, p99_x) in rows {
        println!(
            "   {:<10} {:>18} {:>18} {:>22} {:>14}",
            o.setup.as_str(),
            fmt_opt(main_cut, 1),
            o.main()
                .connections
                .map_or("n/a".to_string(), |c| c.to_string()),
            fmt_opt(cpu_x, 1),
            fmt_opt(p99_x, 1)
        );
    }
    compared
}

/// Waits until `sink` holds `expected` deliveries, or at most `drain`: a design that falls
/// behind is reported with what it delivered in time, not waited for.
async fn drain(sink: &Sink, expected: u64, drain: Duration) {
    let limit = Instant::now() + drain;
    while sink.delivered.load(Relaxed) < expected && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// End-to-end delays in microseconds: p50 and p99 of everything, p99 of market data, p99
/// of logic.
#[derive(Debug, Clone, Copy, Default)]
struct Delays {
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    md_p99_us: Option<f64>,
    logic_p99_us: Option<f64>,
}

fn delays(sink: &Sink) -> Delays {
    let (Ok(md), Ok(logic)) = (sink.md.lock(), sink.logic.lock()) else {
        return Delays::default();
    };
    let q =
        |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e3);
    let mut all = md.clone();
    let _ = all.add(&*logic);
    Delays {
        p50_us: q(&all, 0.50),
        p99_us: q(&all, 0.99),
        md_p99_us: q(&md, 0.99),
        logic_p99_us: q(&logic, 0.99),
    }
}

async fn redis_conn(client: &redis::Client, name: &str) -> Result<MultiplexedConnection> {
    let mut conn = client
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .map_err(|e| client_err("connect to the main Redis", e))?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| client_err("CLIENT SETNAME", e))?;
    Ok(conn)
}

fn md_stream(trade: bool) -> &'static str {
    if trade {
        "md:trades"
    } else {
        "md:quotes"
    }
}

/// The one-Redis design the platform started from.
async fn before(t: &Traffic) -> Result<Outcome> {
    let main = Broker::open(Transport::Redis, None).await?;
    let url = main.url().unwrap_or_default().to_string();
    let client = redis::Client::open(url.as_str()).map_err(|e| client_err("redis URL", e))?;
    let sink = Sink::new();
    let mut tasks = Vec::new();
    // Groups first, at `$`, so nothing published later is missed.
    let mut admin = redis_conn(&client, "bench-admin").await?;
    for engine in ENGINES {
        let mut streams: Vec<String> = Vec::new();
        if Traffic::md_subscriber(engine) {
            streams.extend(["md:quotes".to_string(), "md:trades".to_string()]);
        }
        streams.extend(
            Traffic::producers_of(engine)
                .iter()
                .map(|p| format!("engine:{p}")),
        );
        for s in &streams {
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(s)
                .arg(engine)
                .arg("$")
                .arg("MKSTREAM")
                .query_async::<()>(&mut admin)
                .await
                .map_err(|e| client_err("XGROUP CREATE", e))?;
        }
        // Three connections per process: publish, read, state.
        let _state = redis_conn(&client, &format!("before:{engine}:state")).await?;
        let mut read = redis_conn(&client, &format!("before:{engine}:read")).await?;
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let _state = _state;
            if streams.is_empty() {
                return std::future::pending::<()>().await;
            }
            loop {
                for s in &streams {
                    let reply: StreamReadReply = match redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(engine)
                        .arg(engine)
                        .arg("COUNT")
                        .arg(50)
                        .arg("BLOCK")
                        .arg(1000)
                        .arg("STREAMS")
                        .arg(s)
                        .arg(">")
                        .query_async(&mut read)
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            sink.errors.fetch_add(1, Relaxed);
                            continue;
                        }
                    };
                    for e in reply.keys.into_iter().flat_map(|k| k.ids) {
                        if redis::cmd("XACK")
                            .arg(s)
                            .arg(engine)
                            .arg(&e.id)
                            .query_async::<i64>(&mut read)
                            .await
                            .is_err()
                        {
                            sink.errors.fetch_add(1, Relaxed);
                        }
                        match e.map.get("payload") {
                            Some(redis::Value::BulkString(b)) => {
                                sink.record(b, s.starts_with("md:"))
                            }
                            _ => {
                                sink.errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    // The groups exist: the bench's own connection must not count as an engine's.
    drop(admin);
    let cpu_before = main.cpu_seconds().await;
    let began = tokio::time::Instant::now();
    let deadline = began + t.seconds;
    // The feed: its own three connections; one awaited XADD per message.
    let feed = {
        let mut conn = redis_conn(&client, "before:feed:publish").await?;
        let read = redis_conn(&client, "before:feed:read").await?;
        let state = redis_conn(&client, "before:feed:state").await?;
        let t = t.clone();
        tokio::spawn(async move {
            let _idle = (read, state);
            let mut n = 0u64;
            while t.md_due(began, n, deadline).await {
                let (trade, symbol) = t.md(n);
                let ok = xadd_capped(md_stream(trade))
                    .arg("symbol")
                    .arg(symbol)
                    .arg("payload")
                    .arg(stamped(t.payload).as_ref())
                    .query_async::<redis::Value>(&mut conn)
                    .await;
                if ok.is_err() {
                    break;
                }
                n += 1;
            }
            n
        })
    };
    let mut publishers = Vec::new();
    for engine in ENGINES {
        let mut conn = redis_conn(&client, &format!("before:{engine}:publish")).await?;
        let t = t.clone();
        publishers.push((
            engine,
            tokio::spawn(async move {
                let mut n = 0u64;
                while pace(began, t.logic_rate, n, deadline).await {
                    let ok = xadd_capped(&format!("engine:{engine}"))
                        .arg("payload")
                        .arg(stamped(t.payload).as_ref())
                        .query_async::<redis::Value>(&mut conn)
                        .await;
                    if ok.is_err() {
                        break;
                    }
                    n += 1;
                }
                n
            }),
        ));
    }
    tokio::time::sleep(t.seconds / 2).await;
    let connections = main.client_connections().await;
    let md_published = feed.await.unwrap_or(0);
    let mut logic = Vec::new();
    for (engine, p) in publishers {
        logic.push((engine, p.await.unwrap_or(0)));
    }
    let expected = t.expected(md_published, &logic);
    drain(&sink, expected, t.drain).await;
    let cpu_after = main.cpu_seconds().await;
    for task in tasks {
        task.abort();
    }
    let delays = delays(&sink);
    Ok(Outcome {
        setup: Setup::Before,
        published: md_published + logic.iter().map(|(_, n)| n).sum::<u64>(),
        expected,
        delivered: sink.delivered.load(Relaxed),
        errors: sink.errors.load(Relaxed),
        delays,
        brokers: vec![BrokerFigures {
            role: "main redis",
            cpu_s: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
            connections,
        }],
    })
}

/// The routing table every process loads, with its buses on `md` and `engine`.
fn config(app: &str, transport: Transport, md: &Broker, engine: &Broker) -> Result<Config> {
    let kind = transport.as_str();
    let stream_keys = match transport {
        // A fixed subject list: eight processes create or check the same stream.
        Transport::Nats => "subjects = [\"engine.>\"]\n",
        _ => "",
    };
    let text = format!(
        "[app]\nname = \"{app}\"\n\n\
         [buses.marketdata]\ntransport = \"{kind}\"\nurl = \"{}\"\n\n\
         [buses.engine]\ntransport = \"{kind}\"\nurl = \"{}\"\nmode = \"stream\"\n{stream_keys}\n\
         [[routes]]\nmatch = \"marketdata.>\"\nto = \"marketdata\"\n\n\
         [[routes]]\nmatch = \"engine.>\"\nto = \"engine\"\n",
        md.url().unwrap_or_default(),
        engine.url().unwrap_or_default(),
    );
    Config::from_toml(&text, &format!("scenario config of {app}"))
}

/// The same traffic through busway routers: market data and engine logic on their own
/// brokers, the main Redis untouched.
async fn via_busway(t: &Traffic, setup: Setup, transport: Transport) -> Result<Outcome> {
    let main = Broker::open(Transport::Redis, None).await?;
    let md = Broker::open(transport, None).await?;
    let eng = Broker::open(transport, None).await?;
    let registry: Registry = busway_cli::registry();
    let sink = Sink::new();
    let mut routers: Vec<(&str, Arc<Router>)> = Vec::new();
    for app in std::iter::once("feed").chain(ENGINES) {
        let router = Router::from_config(&config(app, transport, &md, &eng)?, &registry).await?;
        routers.push((app, Arc::new(router)));
    }
    let mut tasks = Vec::new();
    for (engine, router) in routers.iter().skip(1) {
        let engine: &'static str = engine;
        if Traffic::md_subscriber(engine) {
            let mut sub = router
                .subscribe(
                    Pattern::new("marketdata.>")?,
                    SubscribeOptions::new()
                        .capacity(65_536)
                        .overflow(Overflow::Block),
                )
                .await?;
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(d) = sub.recv().await {
                    sink.record(&d.message().payload, true);
                }
            }));
        }
        for producer in Traffic::producers_of(engine) {
            let mut sub = router
                .subscribe(
                    Pattern::new(format!("engine.{producer}.out"))?,
                    SubscribeOptions::new()
                        .group(engine)
                        .capacity(65_536)
                        .overflow(Overflow::Block),
                )
                .await?;
            let sink = sink.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(d) = sub.recv().await {
                    if d.ack().await.is_err() {
                        sink.errors.fetch_add(1, Relaxed);
                    }
                    sink.record(&d.message().payload, false);
                }
            }));
        }
    }
    let cpu_before = [
        main.cpu_seconds().await,
        md.cpu_seconds().await,
        eng.cpu_seconds().await,
    ];
    let began = tokio::time::Instant::now();
    let deadline = began + t.seconds;
    let feed = {
        let router = routers[0].1.clone();
        let t = t.clone();
        let topics: Vec<(Topic, Topic)> = t
            .symbols
            .iter()
            .map(|s| {
                Ok((
                    Topic::new(format!("marketdata.quotes.{s}"))?,
                    Topic::new(format!("marketdata.trades.{s}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        tokio::spawn(async move {
            let mut n = 0u64;
            while t.md_due(began, n, deadline).await {
                // One tick: its messages published concurrently.
                let tick = (n..n + t.md_burst).map(|i| {
                    let (trade, _) = t.md(i);
                    let (q, tr) = &topics[(i as usize) % topics.len()];
                    let topic = if trade { tr } else { q };
                    router.publish(Message::new(topic.clone(), stamped(t.payload)))
                });
                let results = futures::future::join_all(tick).await;
                n += results.iter().filter(|r| r.is_ok()).count() as u64;
                if results.iter().any(Result::is_err) {
                    break;
                }
            }
            n
        })
    };
    let mut publishers = Vec::new();
    for (engine, router) in routers.iter().skip(1) {
        let engine: &'static str = engine;
        let router = router.clone();
        let t = t.clone();
        let topic = Topic::new(format!("engine.{engine}.out"))?;
        publishers.push((
            engine,
            tokio::spawn(async move {
                let mut n = 0u64;
                while pace(began, t.logic_rate, n, deadline).await {
                    if router
                        .publish(Message::new(topic.clone(), stamped(t.payload)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    n += 1;
                }
                n
            }),
        ));
    }
    tokio::time::sleep(t.seconds / 2).await;
    let connections = [
        main.client_connections().await,
        md.client_connections().await,
        eng.client_connections().await,
    ];
    let md_published = feed.await.unwrap_or(0);
    let mut logic = Vec::new();
    for (engine, p) in publishers {
        logic.push((engine, p.await.unwrap_or(0)));
    }
    for (_, r) in &routers {
        let _ = r.flush().await;
    }
    let expected = t.expected(md_published, &logic);
    drain(&sink, expected, t.drain).await;
    let cpu_after = [
        main.cpu_seconds().await,
        md.cpu_seconds().await,
        eng.cpu_seconds().await,
    ];
    for task in tasks {
        task.abort();
    }
    for (_, r) in &routers {
        let _ = r.close().await;
    }
    let delays = delays(&sink);
    let (md_role, eng_role) = match transport {
        Transport::Nats => ("marketdata nats", "engine jetstream"),
        _ => ("marketdata redis", "engine redis"),
    };
    let brokers = ["main redis", md_role, eng_role]
        .into_iter()
        .enumerate()
        .map(|(i, role)| BrokerFigures {
            role,
            cpu_s: cpu_before[i].zip(cpu_after[i]).map(|(a, b)| b - a),
            connections: connections[i],
        })
        .collect();
    Ok(Outcome {
        setup,
        published: md_published + logic.iter().map(|(_, n)| n).sum::<u64>(),
        expected,
        delivered: sink.delivered.load(Relaxed),
        errors: sink.errors.load(Relaxed),
        delays,
        brokers,
    })
}

/// `XADD key MAXLEN ~ 100000 *`, the fields still to add: how the one-Redis design's
/// client writes every stream entry.
fn xadd_capped(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("MAXLEN").arg("~").arg(100_000).arg("*");
    cmd
}
