//! The `busway` command: check a config, show where a topic goes, publish, tail, and run the
//! seven-engine demo.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use busway_cli::commands::{self, Answer, TailFormat, TailOptions};
use busway_cli::demo::{self, DemoOptions};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "busway",
    version,
    about = "Route a platform's messages to named buses."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// What to log on stderr: a level (error, warn, info, debug, trace) or a filter like
    /// `busway_redis=debug,info`. Default: RUST_LOG, else `warn`.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// How log lines look.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Logs the library's `tracing` events (reconnects, skipped frames, dead letters...) on
/// stderr, filtered by `--log-level`, else `RUST_LOG`, else `warn`.
fn init_logging(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config (file + BUSWAY_* environment) without connecting, and print its
    /// buses and routing table.
    Check {
        /// The config file.
        file: PathBuf,
    },
    /// Print the bus or buses a topic is routed to.
    Route {
        /// The config file.
        file: PathBuf,
        /// The topic, e.g. marketdata.quotes.AAPL.
        topic: String,
    },
    /// Publish one message through the router.
    Pub(Outgoing),
    /// Send a request through the router and print the first reply's payload.
    Request {
        #[command(flatten)]
        message: Outgoing,
        /// How long to wait for the reply.
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        timeout: f64,
    },
    /// Answer requests on a pattern (with a fixed payload, or echo the request's).
    Reply {
        /// The pattern, e.g. 'engine.prices.*'.
        pattern: String,
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Answer with this payload (default: echo the request's payload).
        #[arg(long, allow_hyphen_values = true)]
        payload: Option<OsString>,
        /// Answer as a member of this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// Stop after answering this many requests.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print messages matching a pattern, one line each: `topic payload`.
    Tail {
        /// The pattern, e.g. 'marketdata.quotes.*' or 'engine.>'.
        pattern: String,
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// At exit, print the subscription's and each bus's counters (delivered, dropped,
        /// decode errors, reconnects...) on stderr.
        #[arg(long)]
        stats: bool,
        /// Subscribe as a member of this consumer group (messages are split between the
        /// group's members; stream buses and NATS).
        #[arg(long)]
        group: Option<String>,
        /// Print each message's headers, one `key: value` line each, under it.
        #[arg(long, conflicts_with = "json")]
        headers: bool,
        /// Print one JSON object per message (topic, payload, headers, attempt).
        #[arg(long)]
        json: bool,
        /// Serve Prometheus metrics on http://ADDR/metrics while tailing.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
    /// Connections to a broker per busway app and bus and per other client, and its CPU use.
    Audit {
        /// redis://HOST:PORT, redis+sentinel://S1:PORT,S2:PORT/MASTER (the primary and its
        /// replicas), redis+cluster://N1:PORT,N2:PORT (every node), or a NATS monitoring URL http://HOST:8222 (a cluster: each node's,
        /// comma-separated).
        url: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// How long to sample the server's CPU counters (Redis).
        #[arg(long, default_value_t = 500, value_name = "N")]
        interval_ms: u64,
        /// The NATS monitoring URL, when URL is nats:// (a cluster: each node's,
        /// comma-separated).
        #[arg(long, value_name = "URL")]
        monitor: Option<String>,
    },
    /// Run a market-data feed and the seven engines wired through the router, then report
    /// per engine and per bus, and check no engine uses the main bus.
    Demo {
        /// The config file (default: every bus in memory, as examples/demo.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to run.
        #[arg(long, default_value_t = 5.0, value_name = "N")]
        seconds: f64,
        /// Only these engines (features, factor, ml, strategy, portfolio, collateral,
        /// websocket), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "A,B")]
        engines: Option<Vec<String>>,
        /// Do not run the market-data feed in this process.
        #[arg(long)]
        no_feed: bool,
        /// Symbols the feed quotes.
        #[arg(long, default_value_t = 8, value_name = "N")]
        symbols: usize,
        /// Feed ticks per second; each tick quotes every symbol.
        #[arg(long, default_value_t = 20.0, value_name = "HZ")]
        rate: f64,
        /// Serve Prometheus metrics on http://ADDR/metrics while running.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// With --metrics-addr: after the report, keep serving the final values (and
        /// `busway_demo_finished 1`) until Ctrl-C or SIGTERM, so a scraper can read them.
        #[arg(long, requires = "metrics_addr")]
        metrics_hold: bool,
    },
    /// A live per-bus table (rates in and out, drops, delivery latency p50/p99, health) read
    /// from a process's metrics endpoint, e.g. `busway demo --metrics-addr 127.0.0.1:9464`.
    Top {
        /// The endpoint to read.
        #[arg(
            long,
            default_value = "http://127.0.0.1:9464/metrics",
            value_name = "URL"
        )]
        metrics_url: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
        /// Stop after this many frames (default: until Ctrl-C).
        #[arg(long, value_name = "N")]
        frames: Option<u64>,
    },
}

/// The message `pub` and `request` send.
#[derive(Debug, clap::Args)]
struct Outgoing {
    /// The topic.
    topic: String,
    /// The payload, sent as the argument's bytes (which need not be UTF-8; it may start with
    /// `-`). Or use --file.
    #[arg(allow_hyphen_values = true, required_unless_present = "file")]
    payload: Option<OsString>,
    /// Read the payload from this file, `-` for stdin (any bytes, any size up to the bus's
    /// max_payload).
    #[arg(long, value_name = "PATH", conflicts_with = "payload")]
    file: Option<PathBuf>,
    /// The config file.
    #[arg(long)]
    config: PathBuf,
    /// A header, key=value (id, content_type, correlation_id, reply_to and source set their
    /// header; other keys are free headers). Repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The payload given as an argument, or read from `file` (`-`: stdin).
fn payload_bytes(arg: Option<OsString>, file: Option<&std::path::Path>) -> Result<Vec<u8>, String> {
    match (arg, file) {
        (Some(p), _) => Ok(p.into_encoded_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
                .map_err(|e| format!("--file -: cannot read stdin: {e}"))?;
            Ok(buf)
        }
        (None, Some(path)) => {
            std::fs::read(path).map_err(|e| format!("--file {}: {e}", path.display()))
        }
        (None, None) => Err("give a payload, or --file PATH (- for stdin)".to_string()),
    }
}

fn seconds(what: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{what}: {secs} is not a duration"))
}

/// Serves `/metrics` on `addr` when given, saying where on stderr.
async fn metrics_server(
    addr: Option<SocketAddr>,
) -> Result<Option<busway::metrics::MetricsServer>, busway::Error> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    // The CLI's commands run at an operator's rates: time every publish and delivery.
    busway::metrics::set_latency_sampling(1);
    let server = busway::metrics::serve(addr).await?;
    eprintln!("busway: metrics on http://{}/metrics", server.local_addr());
    Ok(Some(server))
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("busway: error: {e}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_level.as_deref(), cli.log_format) {
        return fail(e);
    }
    let registry = busway_cli::registry();
    match cli.command {
        Command::Check { file } => match commands::check(&file, &registry) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Route { file, topic } => match commands::route(&file, &topic) {
            Ok(line) => {
                print!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Pub(Outgoing {
            topic,
            payload,
            file,
            config,
            headers,
        }) => {
            let payload = match payload_bytes(payload, file.as_deref()) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            match commands::publish(&config, &topic, &payload, &headers, &registry).await {
                Ok(line) => {
                    eprint!("busway: {line}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Request {
            message:
                Outgoing {
                    topic,
                    payload,
                    file,
                    config,
                    headers,
                },
            timeout,
        } => {
            let (payload, timeout) = match (
                payload_bytes(payload, file.as_deref()),
                seconds("--timeout", timeout),
            ) {
                (Ok(p), Ok(t)) => (p, t),
                (Err(e), _) | (_, Err(e)) => return fail(e),
            };
            match commands::request(&config, &topic, &payload, &headers, timeout, &registry).await {
                Ok(reply) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out
                        .write_all(&reply.payload)
                        .and_then(|()| out.write_all(b"\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Reply {
            pattern,
            config,
            payload,
            group,
            count,
        } => {
            let answer = match payload {
                Some(p) => Answer::Fixed(p.into_encoded_bytes()),
                None => Answer::Echo,
            };
            let options = TailOptions {
                count,
                group,
                ..TailOptions::default()
            };
            match commands::reply(&config, &pattern, answer, &options, &registry).await {
                Ok(n) => {
                    eprintln!("busway: answered {n} requests");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Tail {
            pattern,
            config,
            count,
            timeout,
            stats,
            group,
            headers,
            json,
            metrics_addr,
        } => {
            let _metrics = match metrics_server(metrics_addr).await {
                Ok(m) => m,
                Err(e) => return fail(e),
            };
            let timeout = match timeout.map(|t| seconds("--timeout", t)).transpose() {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            let limits = TailOptions {
                count,
                timeout,
                stats,
                group,
                format: match (headers, json) {
                    (_, true) => TailFormat::Json,
                    (true, _) => TailFormat::Headers,
                    _ => TailFormat::Line,
                },
            };
            let mut stdout = tokio::io::stdout();
            let code = match commands::tail(&config, &pattern, limits, &registry, &mut stdout).await
            {
                Ok(_) => 0,
                Err(e) => {
                    fail(e);
                    1
                }
            };
            // Not a return: a write still blocked on a full stdout pipe (stopped by a signal)
            // would keep the runtime from shutting down.
            std::process::exit(code)
        }
        Command::Audit {
            url,
            json,
            interval_ms,
            monitor,
        } => {
            let options = busway_cli::audit::AuditOptions {
                interval: Duration::from_millis(interval_ms),
                monitor,
            };
            match busway_cli::audit::audit(&url, &options).await {
                Ok(r) if json => {
                    println!("{}", r.to_json());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    print!("{}", r.to_text());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Demo {
            config,
            seconds: secs,
            engines,
            no_feed,
            symbols,
            rate,
            metrics_addr,
            metrics_hold,
        } => {
            let metrics = match metrics_server(metrics_addr).await {
                Ok(m) => m,
                Err(e) => return fail(e),
            };
            let duration = match seconds("--seconds", secs) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            if !(rate.is_finite() && rate > 0.0) {
                return fail(format!("--rate: {rate} must be a positive number"));
            }
            let options = DemoOptions {
                config,
                duration,
                engines,
                feed: !no_feed,
                symbols,
                rate,
                // On a terminal only: piped, stderr stays quiet.
                progress: std::io::stderr().is_terminal(),
            };
            let code = match demo::run(&options, &registry).await {
                Ok(report) => {
                    print!("{report}");
                    if report.pass && report.unflushed.is_none() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail(e),
            };
            if let (Some(_), true) = (&metrics, metrics_hold) {
                metrics::gauge!("busway_demo_finished").set(1.0);
                eprintln!("busway: demo finished; serving its final metrics until Ctrl-C");
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                if let Err(e) = commands::wait_for_stop().await {
                    return fail(e);
                }
            }
            code
        }
        Command::Top {
            metrics_url,
            interval,
            frames,
        } => {
            let interval = match seconds("--interval", interval) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return fail("--interval: must be more than 0"),
                Err(e) => return fail(e),
            };
            match busway_cli::top::run(&metrics_url, interval, frames).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}
