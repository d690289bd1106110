//! Metrics as an operator meets them: a real Prometheus scraping `busway demo
//! --metrics-addr`, and `busway top` in a real terminal (tmux).
//!
//! Each test prints SKIPPED when its tool (`prometheus`, `tmux`) is missing, unless
//! BUSWAY_REQUIRE_BROKERS is set: then it fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUSWAY: &str = env!("CARGO_BIN_EXE_busway");

/// Kills and reaps a child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The tool's path, or `None` after printing SKIPPED (a failure when brokers are required).
fn require(tool: &str, test: &str) -> Option<PathBuf> {
    let found = find(tool);
    if found.is_none() {
        assert!(
            std::env::var_os("BUSWAY_REQUIRE_BROKERS").is_none(),
            "{tool} not found and BUSWAY_REQUIRE_BROKERS is set"
        );
        println!("SKIPPED {test}: {tool} not found");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP GET; the body when the status is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // HTTP/1.0: the answer is never chunked.
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    Some(body.to_string())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result: each series' labels and value.
fn query(port: u16, q: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let Some(body) = http_get(port, &format!("/api/v1/query?query={}", encode(q))) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    v["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .unwrap_or("NaN")
                .parse()
                .unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect()
}

/// The `key=value` fields of the demo's RESULT line.
fn result_fields(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Starts `busway demo --metrics-addr` and returns it with its RESULT line once the run ended.
fn demo_with_metrics(
    port: u16,
    seconds: &str,
    hold: bool,
    config: Option<&std::path::Path>,
) -> (Guard, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(BUSWAY);
    cmd.args([
        "demo",
        "--seconds",
        seconds,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    if hold {
        cmd.arg("--metrics-hold");
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut child = cmd
        .env_remove("BUSWAY_TRANSPORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("busway demo starts");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (Guard(child), out)
}

/// Reads the demo's output up to its RESULT line, and returns the line's fields.
fn result_line(out: &mut BufReader<std::process::ChildStdout>) -> BTreeMap<String, u64> {
    let mut line = String::new();
    while out.read_line(&mut line).expect("demo output") > 0 {
        if line.starts_with("RESULT demo") {
            return result_fields(&line);
        }
        line.clear();
    }
    panic!("the demo printed no RESULT line");
}

/// `--metrics-hold` serves the consumer lag read from the brokers at the end of the run,
/// beside the final counters: a group of another app that never reads the demo's AAPL
/// features stream lags by every entry the demo wrote there.
#[test]
fn the_held_demo_serves_the_final_consumer_lag_of_a_stream_bus() {
    let test = "the_held_demo_serves_the_final_consumer_lag_of_a_stream_bus";
    let Some(redis) = busway_testkit::redis::RedisServer::start(test) else {
        return;
    };
    let topic = "engine.features.AAPL";
    let key = format!("busway:stream:{topic}");
    redis.cli(&["XGROUP", "CREATE", &key, "audit", "$", "MKSTREAM"]);
    redis.cli(&["SADD", "busway:topics", topic]);
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\nname = \"demo\"\n[buses.marketdata]\ntransport = \"memory\"\n\
             [buses.engine]\ntransport = \"redis\"\nurl = \"{}\"\nmode = \"stream\"\n\
             [buses.main]\ntransport = \"memory\"\n\
             [[routes]]\nmatch = \"marketdata.>\"\nto = \"marketdata\"\n\
             [[routes]]\nmatch = \"engine.>\"\nto = \"engine\"\n[default]\nto = \"main\"\n",
            redis.url()
        ),
    )
    .expect("config written");
    let port = free_port();
    let (_demo, mut out) = demo_with_metrics(port, "2", true, Some(&config));
    let result = result_line(&mut out);
    assert!(
        result["received"] > 0,
        "the demo moved messages: {result:?}"
    );
    let written: f64 = redis.cli(&["XLEN", &key]).trim().parse().expect("XLEN");
    assert!(written > 0.0, "the demo wrote AAPL features");
    let body = http_get(port, "/metrics").expect("the held demo serves /metrics");
    let lag: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("busway_consumer_lag{") && l.contains("group=\"audit\""))
        .collect();
    assert_eq!(lag.len(), 1, "the audit group's lag: {lag:?}");
    assert!(lag[0].contains("bus=\"engine\""), "{}", lag[0]);
    let value: f64 = lag[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(value, written, "lag = entries the group never read");
}

#[test]
fn prometheus_scrapes_the_demo_and_agrees_with_its_result_line() {
    let Some(prometheus) = require("prometheus", "prometheus_scrapes_the_demo") else {
        return;
    };
    let (metrics_port, prom_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: busway\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .expect("config written");
    let _prom = Guard(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );

    let (_demo, mut out) = demo_with_metrics(metrics_port, "4", true, None);
    let result = result_line(&mut out);
    assert!(
        result["received"] > 0,
        "the demo moved messages: {result:?}"
    );

    // The demo serves its final values (and busway_demo_finished 1) after the run: once
    // Prometheus holds a scrape with the flag, the counters it holds are the final ones.
    let deadline = Instant::now() + Duration::from_secs(60);
    while query(prom_port, "busway_demo_finished == 1").is_empty() {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the finished demo"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let published = query(prom_port, "busway_published_total");
    let buses: BTreeMap<String, f64> = published
        .iter()
        .map(|(l, v)| (l["bus"].clone(), *v))
        .collect();
    for bus in ["engine", "main", "marketdata"] {
        assert_eq!(
            buses.get(bus).copied(),
            Some(result[&format!("ok_publishes.{bus}")] as f64),
            "published on {bus}: Prometheus {published:?}, demo {result:?}"
        );
    }
    for (labels, _) in &published {
        assert_eq!(labels["app"], "demo");
        assert_eq!(labels["transport"], "memory");
        assert_eq!(labels["mode"], "broadcast");
        assert_eq!(labels["job"], "busway");
    }
    let delivered = query(prom_port, "sum(busway_delivered_total)");
    assert_eq!(
        delivered[0].1, result["received"] as f64,
        "delivered = received by engines"
    );
    let latency = query(prom_port, "sum(busway_delivery_latency_seconds_count)");
    assert_eq!(
        latency[0].1, result["received"] as f64,
        "one latency sample per delivery"
    );
    let dropped = query(prom_port, "sum(busway_dropped_total)");
    assert_eq!(dropped[0].1, result["dropped"] as f64);
    let p99 = query(
        prom_port,
        "histogram_quantile(0.99, sum by (le, bus) (busway_delivery_latency_seconds_bucket{bus=\"marketdata\"}))",
    );
    assert!(
        p99[0].1 > 0.0 && p99[0].1 < 5.0,
        "a marketdata p99 in range: {p99:?}"
    );
    let health = query(prom_port, "busway_bus_health == 1");
    assert_eq!(health.len(), 3, "one health state per bus: {health:?}");
    assert!(!query(prom_port, "busway_router_generation").is_empty());
}

/// A command in a detached session of a private tmux server (its own socket, so the test
/// never touches the user's sessions), 160 x 30; the server is killed when dropped.
struct Tmux {
    bin: PathBuf,
    socket: String,
    session: String,
}

impl Tmux {
    fn start(bin: PathBuf, session: &str, command: &str) -> Tmux {
        let tmux = Tmux {
            bin,
            socket: format!("busway-{session}-{}", std::process::id()),
            session: session.to_string(),
        };
        let started = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "160",
            "-y",
            "30",
            command,
        ]);
        assert!(started.status.success(), "tmux: {started:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs")
    }

    /// The pane's text now.
    fn capture(&self) -> String {
        let capture = self.run(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&capture.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// On a terminal the demo shows a progress line with the router's counters while the feed
/// runs, and clears it before the report; piped, its stderr holds no progress at all.
#[test]
fn the_demo_shows_progress_on_a_terminal_and_nothing_when_piped() {
    let Some(tmux) = require("tmux", "the_demo_shows_progress") else {
        return;
    };
    // `; sleep` keeps the pane (and its last screen) after the demo exits.
    let demo = format!("env -u BUSWAY_TRANSPORT {BUSWAY} demo --seconds 4; sleep 30");
    let tmux = Tmux::start(tmux, "demo", &demo);
    let mut progress = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let screen = tmux.capture();
        if let Some(line) = screen.lines().find(|l| l.starts_with("demo [")) {
            let published = line
                .split_whitespace()
                .skip_while(|w| *w != "published")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok());
            if published.is_some_and(|n| n > 0) {
                progress = Some(line.to_string());
                break;
            }
        }
    }
    let progress = progress.expect("a progress line with published messages");
    assert!(progress.contains("delivered"), "{progress}");
    // After the run the report replaces the line.
    let deadline = Instant::now() + Duration::from_secs(30);
    let screen = loop {
        let screen = tmux.capture();
        if screen.contains("RESULT demo") {
            break screen;
        }
        assert!(Instant::now() < deadline, "no report:\n{screen}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(!screen.contains("demo ["), "the bar is cleared:\n{screen}");

    let piped = Command::new(BUSWAY)
        .args(["demo", "--seconds", "1"])
        .env_remove("BUSWAY_TRANSPORT")
        .output()
        .expect("busway demo runs");
    assert!(piped.status.success(), "{piped:?}");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("demo [") && !stderr.contains('\r') && !stderr.contains("delivered"),
        "piped stderr: {stderr}"
    );
}

#[test]
fn top_in_a_terminal_shows_every_bus_with_live_rates() {
    let Some(tmux) = require("tmux", "top_in_a_terminal") else {
        return;
    };
    let port = free_port();
    let (_demo, _out) = demo_with_metrics(port, "30", false, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Some(m) = http_get(port, "/metrics") {
            break m;
        }
        assert!(Instant::now() < deadline, "the demo never served /metrics");
        std::thread::sleep(Duration::from_millis(100));
    };
    // While it runs, each engine subscription's queue has its gauge (labelled by pattern).
    assert!(
        metrics.contains("busway_subscription_queue_depth{app=\"demo\",bus=\"marketdata\",transport=\"memory\",mode=\"broadcast\",pattern=\"marketdata.quotes.*\",group=\"\"}"),
        "{metrics}"
    );
    let top = format!("{BUSWAY} top --metrics-url http://127.0.0.1:{port}/metrics --interval 0.5");
    let tmux = Tmux::start(tmux, "top", &top);
    let mut screen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        screen = tmux.capture();
        let row = |bus: &str| {
            screen
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(bus))
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        };
        let (Some(md), Some(engine), Some(main)) = (row("marketdata"), row("engine"), row("main"))
        else {
            continue;
        };
        let rate = |r: &[String], i: usize| r[i].parse::<f64>().unwrap_or(0.0);
        // Columns: app bus transport mode health in/s out/s ...
        if rate(&md, 5) > 0.0 && rate(&md, 6) > 0.0 && rate(&engine, 5) > 0.0 {
            assert_eq!(md[4], "up");
            assert_eq!(rate(&main, 5), 0.0, "nothing goes through main");
            assert!(screen.contains("p99 ms"), "{screen}");
            return;
        }
    }
    panic!("top never showed the buses with live rates:\n{screen}");
}
