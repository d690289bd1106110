//! Ctrl-C (SIGINT) in `busway demo` on Redis streams: the run stops the graceful way (feed
//! stopped, engines drained, router flushed and closed), the process exits 0, and every
//! publish the demo reports as Ok is on the broker.

mod common;
use common::Spawned;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use busway_testkit::redis::RedisServer;

fn workspace_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The `key=value` fields of the demo's `RESULT demo ...` line.
fn result_line(stdout: &str) -> BTreeMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT demo "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn number(fields: &BTreeMap<String, String>, key: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {fields:?}"))
}

#[test]
fn ctrl_c_in_the_demo_on_redis_streams_leaves_every_ok_publish_on_the_broker() {
    let test = "ctrl_c_in_the_demo_on_redis_streams_leaves_every_ok_publish_on_the_broker";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    // The shipped Redis demo config, every bus moved to this server and to stream mode by
    // the environment overrides a deployment would use.
    let mut env = Vec::new();
    for bus in ["MARKETDATA", "ENGINE", "MAIN"] {
        env.push((format!("BUSWAY_BUS_{bus}_URL"), redis.url()));
        env.push((format!("BUSWAY_BUS_{bus}_MODE"), "stream".to_string()));
    }
    let config = workspace_file("examples/demo-redis.toml");
    let mut demo = Spawned::start_env(
        &[
            "demo",
            "--config",
            config.to_str().unwrap(),
            "--seconds",
            "120",
            "--rate",
            "100",
        ],
        &env,
    );
    demo.wait_stderr("busway: demo running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    demo.interrupt();
    let (code, stdout, stderr) = demo.finish(Duration::from_secs(90));
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("(stopped by a signal: Ctrl-C or SIGTERM)"),
        "{stdout}"
    );
    let result = result_line(&stdout);
    assert_eq!(result.get("interrupted").map(|s| &**s), Some("true"));
    let ok = number(&result, "ok_publishes");
    assert!(
        number(&result, "ok_publishes.marketdata") > 0
            && number(&result, "ok_publishes.engine") > 0,
        "both the feed and the engines published: {stdout}"
    );

    // Every publish that returned Ok is an entry of a busway stream, and nothing else is.
    let keys: Vec<String> = redis
        .cli(&["--scan", "--pattern", "busway:stream:*"])
        .lines()
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no busway streams on the broker");
    let xlen: u64 = keys
        .iter()
        .map(|k| redis.cli(&["XLEN", k]).trim().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        xlen, ok,
        "entries on the broker vs publishes the demo reported Ok\n{stdout}"
    );

    // Every delivery handed to an engine was acked, and every ack returned Ok (the server
    // confirmed its XACK). Entries a queue's overflow policy dropped, or still queued when
    // the engines stopped, are not acked: at least once, they stay pending for redelivery.
    assert_eq!(number(&result, "errors"), 0, "{stdout}");
    assert_eq!(
        number(&result, "acked"),
        number(&result, "received"),
        "{stdout}"
    );
}

/// SIGTERM (what systemd, Kubernetes and other service managers send) stops `demo` and
/// `tail` the way Ctrl-C does: drained, reported, exit 0.
#[test]
fn sigterm_stops_demo_and_tail_like_ctrl_c() {
    let config = workspace_file("examples/demo.toml");
    let config = config.to_str().unwrap();
    let mut demo = Spawned::start_env(&["demo", "--config", config, "--seconds", "120"], &[]);
    demo.wait_stderr("busway: demo running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    demo.signal("-TERM");
    let (code, stdout, stderr) = demo.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("(stopped by a signal"), "{stdout}");
    assert_eq!(
        result_line(&stdout).get("interrupted").map(|s| &**s),
        Some("true")
    );

    let mut tail = Spawned::start_env(&["tail", "marketdata.>", "--config", config], &[]);
    tail.wait_stderr("busway: tailing", Duration::from_secs(30));
    tail.signal("-TERM");
    let (code, stdout, stderr) = tail.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
}

/// Ctrl-C stops `busway tail` even while its stdout is a full pipe nobody reads.
#[test]
fn ctrl_c_stops_a_tail_whose_stdout_is_full() {
    use std::process::{Command, Stdio};
    let test = "ctrl_c_stops_a_tail_whose_stdout_is_full";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("busway.toml");
    std::fs::write(
        &config,
        format!(
            "[buses.main]\ntransport = \"redis\"\nurl = \"{}\"\nframing = \"raw\"\n[default]\nto = \"main\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr");
    // stdout is a pipe this test never reads: it fills after ~64 KiB.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_busway"))
        .args(["tail", "x.>", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&stderr_path)
        .unwrap()
        .contains("busway: tailing")
    {
        assert!(std::time::Instant::now() < deadline, "tail did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let payload = "p".repeat(4096);
    for _ in 0..64 {
        redis.cli(&["PUBLISH", "x.y", &payload]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let kill = Command::new("kill")
        .args(["-INT", &tail.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = tail.kill();
            panic!("tail still running 10 s after Ctrl-C with a full stdout pipe");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// Ctrl-C of a demo whose broker is frozen (SIGSTOP): the report is still printed, says what
/// could not be flushed, and the exit code is 1.
#[test]
fn a_demo_stopped_with_its_broker_frozen_still_reports() {
    let test = "a_demo_stopped_with_its_broker_frozen_still_reports";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let mut env = Vec::new();
    for bus in ["MARKETDATA", "ENGINE", "MAIN"] {
        env.push((format!("BUSWAY_BUS_{bus}_URL"), redis.url()));
        env.push((format!("BUSWAY_BUS_{bus}_MODE"), "stream".to_string()));
    }
    // The shipped config with a short publish timeout, so the frozen broker fails fast.
    let text = std::fs::read_to_string(workspace_file("examples/demo-redis.toml"))
        .unwrap()
        .replace(
            "transport = \"redis\"",
            "transport = \"redis\"\npublish_timeout = \"1s\"",
        );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    std::fs::write(&config, text).unwrap();
    let mut demo = Spawned::start_env(
        &[
            "demo",
            "--config",
            config.to_str().unwrap(),
            "--seconds",
            "120",
        ],
        &env,
    );
    demo.wait_stderr("busway: demo running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    redis.pause();
    std::thread::sleep(Duration::from_millis(300));
    demo.interrupt();
    let (code, stdout, stderr) = demo.finish(Duration::from_secs(90));
    redis.resume();
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("RESULT demo interrupted=true"), "{stdout}");
    assert!(stdout.contains("not flushed: "), "{stdout}");
}
