//! The `busway` binary, run as a user runs it.

mod common;
use common::Spawned;

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `busway args` with `env` (and no inherited BUSWAY_* variables); kills it and fails
/// the test if it takes longer than a minute.
fn busway_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_busway"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BUSWAY_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("busway {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| {
        let mut s = String::new();
        std::fs::File::open(p)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    Run {
        code: status.code(),
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

fn busway(args: &[&str]) -> Run {
    busway_env(args, &[])
}

/// Writes `text` to `name` in a fresh directory; returns the directory (keep it alive) and
/// the path.
fn config_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

const GOOD: &str = r#"
[app]
name = "portfolio"

[buses.marketdata]
transport = "memory"
overflow = "latest"
capacity = 64

[buses.engine]
transport = "memory"
url = "redis://svc:hunter2@10.0.0.7:6381/0"

[buses.main]
transport = "memory"

[[routes]]
match = "marketdata.>"
to = "marketdata"

[[routes]]
match = "engine.audit.*"
to = ["engine", "main"]

[[routes]]
match = "engine.>"
to = "engine"

[default]
to = "main"
"#;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn workspace_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn check_prints_buses_with_redacted_urls_and_the_routing_table() {
    let (_d, path) = config_file("platform.toml", GOOD);
    let run = busway(&["check", s(&path)]);
    assert!(run.ok(), "{run:?}");
    let out = &run.stdout;
    assert!(out.contains("platform.toml"), "{run:?}");
    assert!(!out.contains("hunter2"), "password printed: {run:?}");
    assert!(out.contains("redis://svc:***@10.0.0.7:6381/0"), "{run:?}");
    let line = |start: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?}: {run:?}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("marketdata "),
        ["marketdata", "memory", "broadcast", "-", "latest", "64"]
    );
    assert_eq!(
        line("main "),
        ["main", "memory", "broadcast", "-", "block", "1024"]
    );
    assert_eq!(line("1 "), ["1", "marketdata.>", "marketdata"]);
    assert_eq!(line("2 "), ["2", "engine.audit.*", "engine,", "main"]);
    assert_eq!(line("(default)"), ["(default)", "main"]);
}

#[test]
fn check_names_file_key_and_reason() {
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "[buses.main]\ntransport = \"memory\"\nmode = \"streem\"\n",
            "bad mode",
            &["buses.main", "streem"],
        ),
        (
            "[buses.main]\ntransport = \"memory\"\n[[routes]]\nmatch = \"engine.>\"\nto = \"engine\"\n",
            "unknown bus",
            &["routes[0].to", "unknown bus \"engine\"", "main"],
        ),
        (
            "[buses.main]\ntransport = \"memory\"\n[[routes]]\nmatch = \"engine.*x\"\nto = \"main\"\n",
            "bad pattern",
            &["routes[0].match", "engine.*x"],
        ),
        (
            "[buses.main\ntransport = \"memory\"\n",
            "toml syntax",
            &["line 1"],
        ),
    ];
    for (text, what, needles) in cases {
        let (_d, path) = config_file("broken.toml", text);
        let run = busway(&["check", s(&path)]);
        assert!(!run.ok(), "{what}: {run:?}");
        assert!(run.stdout.is_empty(), "{what}: {run:?}");
        assert!(run.stderr.contains("broken.toml"), "{what}: {run:?}");
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{what}: no {needle:?}: {run:?}"
            );
        }
    }
}

#[test]
fn check_reports_a_missing_file() {
    let run = busway(&["check", "/nonexistent/busway.toml"]);
    assert!(!run.ok(), "{run:?}");
    assert!(
        run.stderr.contains("/nonexistent/busway.toml") && run.stderr.contains("cannot read"),
        "{run:?}"
    );
}

#[test]
fn check_rejects_an_unknown_transport_listing_the_known_ones() {
    let (_d, path) = config_file(
        "kafka.toml",
        "[buses.main]\ntransport = \"kafka\"\n[default]\nto = \"main\"\n",
    );
    let run = busway(&["check", s(&path)]);
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("kafka.toml"), "{run:?}");
    assert!(run.stderr.contains("buses.main.transport"), "{run:?}");
    assert!(run.stderr.contains("\"kafka\""), "{run:?}");
    assert!(
        run.stderr.contains("known transports: memory, nats, redis"),
        "{run:?}"
    );
}

#[test]
fn check_applies_environment_overrides() {
    let (_d, path) = config_file("platform.toml", GOOD);
    let run = busway_env(
        &["check", s(&path)],
        &[("BUSWAY_BUS_ENGINE_TRANSPORT", "carrier-pigeon")],
    );
    assert!(!run.ok(), "{run:?}");
    assert!(
        run.stderr.contains("buses.engine.transport") && run.stderr.contains("carrier-pigeon"),
        "{run:?}"
    );
    let run = busway_env(
        &["check", s(&path)],
        &[("BUSWAY_BUS_ENGINE_URL", "redis://other:6390")],
    );
    assert!(run.ok(), "{run:?}");
    assert!(run.stdout.contains("redis://other:6390"), "{run:?}");
}

#[test]
fn route_prints_the_buses_and_the_rule() {
    let (_d, path) = config_file("platform.toml", GOOD);
    let cases = [
        ("marketdata.quotes.AAPL", "-> marketdata  (routes[0]"),
        ("engine.audit.login", "-> engine, main  (routes[1]"),
        ("engine.orders.AAPL", "-> engine  (routes[2]"),
        ("backend.users.42", "-> main  (default)"),
    ];
    for (topic, expected) in cases {
        let run = busway(&["route", s(&path), topic]);
        assert!(run.ok(), "{run:?}");
        assert!(
            run.stdout.starts_with(&format!("{topic} {expected}")),
            "{topic}: {run:?}"
        );
    }
}

#[test]
fn route_fails_for_unrouted_and_invalid_topics() {
    let (_d, path) = config_file(
        "nodefault.toml",
        "[buses.md]\ntransport = \"memory\"\n[[routes]]\nmatch = \"marketdata.>\"\nto = \"md\"\n",
    );
    let run = busway(&["route", s(&path), "engine.orders.AAPL"]);
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("engine.orders.AAPL"), "{run:?}");
    let run = busway(&["route", s(&path), "marketdata.*.AAPL"]);
    assert!(!run.ok(), "{run:?}");
    assert!(
        run.stderr.contains("invalid topic \"marketdata.*.AAPL\""),
        "{run:?}"
    );
}

/// The engine table's row for `name`: [in, out] and the whole line.
fn engine_row<'a>(out: &'a str, name: &str) -> Option<(u64, u64, &'a str)> {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    Some((cols[2].parse().ok()?, cols[3].parse().ok()?, line))
}

/// The bus table's row for `name`: published, delivered, dropped.
fn bus_row(out: &str, name: &str) -> (u64, u64, u64) {
    let section = out.split("\nbuses\n").nth(1).expect("a bus table");
    let line = section
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no bus row {name}:\n{out}"));
    let cols: Vec<u64> = line
        .split_whitespace()
        .skip(2)
        .take(3)
        .map(|c| c.parse().unwrap())
        .collect();
    (cols[0], cols[1], cols[2])
}

#[test]
fn demo_runs_all_engines_in_memory_and_passes_the_migration_check() {
    let run = busway(&["demo", "--seconds", "2", "--rate", "50"]);
    assert!(run.ok(), "{run:?}");
    let out = &run.stdout;
    let (_, feed_out, _) = engine_row(out, "feed").expect("feed row");
    assert!(feed_out > 0, "{run:?}");
    for (name, port) in [
        ("features", 8500),
        ("factor", 8300),
        ("ml", 8400),
        ("strategy", 8700),
        ("portfolio", 8900),
        ("collateral", 9000),
        ("websocket", 8600),
    ] {
        let (received, _, line) =
            engine_row(out, name).unwrap_or_else(|| panic!("no row for {name}: {run:?}"));
        assert!(received > 0, "{name} received nothing: {run:?}");
        assert!(line.contains(&port.to_string()), "{line}");
        assert!(!line.contains("main"), "{name} used main: {line}");
    }
    // Every stage of the pipeline produced: features -> factor/ml -> strategy orders.
    for name in ["features", "factor", "ml"] {
        assert!(engine_row(out, name).unwrap().1 > 0, "{name}: {run:?}");
    }
    let (md_pub, md_del, _) = bus_row(out, "marketdata");
    let (eng_pub, _, _) = bus_row(out, "engine");
    let (main_pub, main_del, _) = bus_row(out, "main");
    assert!(md_pub > 0 && md_del > 0 && eng_pub > 0, "{run:?}");
    assert_eq!((main_pub, main_del), (0, 0), "{run:?}");
    assert!(out.contains("p50 µs") && out.contains("p99 µs"), "{run:?}");
    assert!(out.contains("migration check: PASS"), "{run:?}");
}

#[test]
fn demo_runs_only_the_named_engines() {
    let run = busway(&[
        "demo",
        "--seconds",
        "1",
        "--engines",
        "portfolio,collateral",
    ]);
    assert!(run.ok(), "{run:?}");
    for name in ["feed", "portfolio", "collateral"] {
        assert!(engine_row(&run.stdout, name).is_some(), "{name}: {run:?}");
    }
    for name in ["features", "factor", "ml", "strategy", "websocket"] {
        assert!(engine_row(&run.stdout, name).is_none(), "{name}: {run:?}");
    }
    // Portfolio hears trades from the feed even with no strategy sending orders.
    assert!(
        engine_row(&run.stdout, "portfolio").unwrap().0 > 0,
        "{run:?}"
    );
    assert!(run.stdout.contains("migration check: PASS"), "{run:?}");

    let run = busway(&[
        "demo",
        "--seconds",
        "1",
        "--engines",
        "collateral",
        "--no-feed",
    ]);
    assert!(run.ok(), "{run:?}");
    assert!(engine_row(&run.stdout, "feed").is_none(), "{run:?}");
    assert_eq!(
        engine_row(&run.stdout, "collateral").unwrap().0,
        0,
        "{run:?}"
    );
}

#[test]
fn demo_rejects_an_unknown_engine() {
    let run = busway(&["demo", "--seconds", "1", "--engines", "portfolio,risk"]);
    assert!(!run.ok(), "{run:?}");
    assert!(
        run.stderr.contains("\"risk\"") && run.stderr.contains("collateral"),
        "{run:?}"
    );
}

#[test]
fn demo_fails_the_migration_check_when_engine_traffic_goes_to_main() {
    // The pre-migration layout: only market data has its own bus.
    let (_d, path) = config_file(
        "before.toml",
        r#"
[buses.marketdata]
transport = "memory"
[buses.main]
transport = "memory"
[[routes]]
match = "marketdata.>"
to = "marketdata"
[default]
to = "main"
"#,
    );
    let run = busway(&["demo", "--config", s(&path), "--seconds", "1"]);
    assert!(!run.ok(), "{run:?}");
    assert!(run.stdout.contains("migration check: FAIL"), "{run:?}");
    assert!(run.stdout.contains("still on \"main\""), "{run:?}");
}

#[test]
fn the_shipped_demo_config_is_the_built_in_one() {
    let run = busway(&[
        "demo",
        "--config",
        &workspace_file("examples/demo.toml"),
        "--seconds",
        "1",
    ]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stdout.contains("migration check: PASS"), "{run:?}");
    for example in [
        "examples/demo-redis.toml",
        "examples/demo-redis-stream.toml",
        "examples/demo-nats.toml",
    ] {
        // Parses, and names only transports from the known set or the broker crates.
        let run = busway(&["route", &workspace_file(example), "engine.orders.AAPL"]);
        assert!(run.ok(), "{example}: {run:?}");
        assert!(run.stdout.contains("-> engine"), "{example}: {run:?}");
    }
}

#[test]
fn tail_on_memory_stops_at_the_timeout_with_no_lines() {
    let run = busway(&[
        "tail",
        "marketdata.>",
        "--config",
        &workspace_file("examples/demo.toml"),
        "--timeout",
        "1",
    ]);
    assert!(run.ok(), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("tailing marketdata.>"), "{run:?}");
}

#[test]
fn pub_publishes_or_names_what_is_wrong() {
    let demo = workspace_file("examples/demo.toml");
    let run = busway(&[
        "pub",
        "engine.orders.AAPL",
        "{\"qty\":10}",
        "--config",
        &demo,
        "--header",
        "desk=eq",
    ]);
    assert!(run.ok(), "{run:?}");
    assert!(run.stderr.contains("to engine"), "{run:?}");
    let run = busway(&["pub", "engine.*", "x", "--config", &demo]);
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("invalid topic"), "{run:?}");
    let run = busway(&["pub", "a.b", "x", "--config", &demo, "--header", "novalue"]);
    assert!(!run.ok(), "{run:?}");
    assert!(run.stderr.contains("KEY=VALUE"), "{run:?}");
}

/// Waits for a spawned `busway` to exit (60 s at most).
fn finished(spawned: Spawned) -> Run {
    let (code, stdout, stderr) = spawned.finish(Duration::from_secs(60));
    Run {
        code,
        stdout,
        stderr,
    }
}

fn redis_config(
    name: &str,
    marketdata: &str,
    engine: &str,
    main: &str,
) -> (tempfile::TempDir, PathBuf) {
    config_file(
        name,
        &format!(
            r#"
[app]
name = "clitest"
[buses.marketdata]
transport = "redis"
url = "{marketdata}"
[buses.engine]
transport = "redis"
url = "{engine}"
[buses.main]
transport = "redis"
url = "{main}"
[[routes]]
match = "marketdata.>"
to = "marketdata"
[[routes]]
match = "engine.>"
to = "engine"
[default]
to = "main"
"#
        ),
    )
}

#[test]
fn pub_and_tail_work_across_processes_on_redis() {
    use std::os::unix::ffi::OsStrExt;
    let test = "pub_and_tail_work_across_processes_on_redis";
    let Some(redis) = busway_testkit::redis::RedisServer::start(test) else {
        return;
    };
    let url = redis.url();
    let (_d, path) = redis_config("redis.toml", &url, &url, &url);
    let config = path.as_os_str();
    let tail = Spawned::start(&[
        OsStr::new("tail"),
        OsStr::new("engine.>"),
        OsStr::new("--config"),
        config,
        OsStr::new("--count"),
        OsStr::new("2"),
        OsStr::new("--timeout"),
        OsStr::new("30"),
    ]);
    let mut tail = tail;
    tail.wait_stderr("tailing engine.>", Duration::from_secs(10));
    for (topic, payload) in [
        ("engine.orders.AAPL", &b"{\"qty\":10}"[..]),
        ("engine.margin", &b"caf\xc3\xa9 \xff\nend"[..]),
    ] {
        let run = Spawned::start(&[
            OsStr::new("pub"),
            OsStr::new(topic),
            OsStr::from_bytes(payload),
            OsStr::new("--config"),
            config,
        ]);
        let run = finished(run);
        assert!(run.ok(), "{run:?}");
    }
    let run = finished(tail);
    assert!(run.ok(), "{run:?}");
    assert_eq!(
        run.stdout, "engine.orders.AAPL {\"qty\":10}\nengine.margin café \\xff\\nend\n",
        "{run:?}"
    );
}

#[test]
fn demo_splits_into_processes_on_redis() {
    let test = "demo_splits_into_processes_on_redis";
    let (Some(md), Some(engine), Some(main)) = (
        busway_testkit::redis::RedisServer::start(test),
        busway_testkit::redis::RedisServer::start(test),
        busway_testkit::redis::RedisServer::start(test),
    ) else {
        return;
    };
    let (_d, path) = redis_config("split.toml", &md.url(), &engine.url(), &main.url());
    let config = path.to_str().unwrap();
    let arg = |s: &'static str| OsStr::new(s);
    // The back office outlives the front office, which runs the feed.
    let back = Spawned::start(&[
        arg("demo"),
        arg("--config"),
        OsStr::new(config),
        arg("--engines"),
        arg("portfolio,collateral"),
        arg("--no-feed"),
        arg("--seconds"),
        arg("8"),
    ]);
    let front = busway(&[
        "demo",
        "--config",
        config,
        "--engines",
        "features,factor,ml,strategy,websocket",
        "--seconds",
        "3",
    ]);
    assert!(front.ok(), "{front:?}");
    assert!(
        engine_row(&front.stdout, "strategy").unwrap().1 > 0,
        "{front:?}"
    );
    let back = finished(back);
    assert!(back.ok(), "{back:?}");
    for name in ["portfolio", "collateral"] {
        assert!(
            engine_row(&back.stdout, name).unwrap().0 > 0,
            "{name}: {back:?}"
        );
    }
    assert!(back.stdout.contains("migration check: PASS"), "{back:?}");
    assert_eq!(bus_row(&back.stdout, "main").0, 0, "{back:?}");
}
