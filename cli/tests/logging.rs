//! The CLI logs the library's events on stderr: `--log-level` (or `RUST_LOG`) picks what,
//! `--log-format json` makes each line a JSON object. A broker lost and back under `busway
//! tail` is told at warn, then info.

mod common;
use common::Spawned;

use std::time::Duration;

use busway_testkit::redis::RedisServer;

#[test]
fn tail_logs_a_lost_and_regained_broker() {
    let test = "tail_logs_a_lost_and_regained_broker";
    let Some(mut redis) = RedisServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("busway.toml");
    std::fs::write(
        &config,
        format!(
            "[buses.main]\ntransport = \"redis\"\nurl = \"{}\"\n[default]\nto = \"main\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mut tail = Spawned::start(&[
        "--log-level",
        "info",
        "--log-format",
        "json",
        "tail",
        "x.>",
        "--config",
        config,
    ]);
    tail.wait_stderr("busway: tailing", Duration::from_secs(30));
    redis.kill();
    tail.wait_stderr("pub/sub connection lost", Duration::from_secs(30));
    redis.restart();
    tail.wait_stderr("resubscribed", Duration::from_secs(30));
    let stderr = tail.read("stderr");
    let lost = stderr
        .lines()
        .find(|l| l.contains("pub/sub connection lost"))
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(lost).expect("a JSON log line");
    assert_eq!(event["level"], "WARN", "{lost}");
    assert_eq!(event["fields"]["bus"], "main", "{lost}");
    tail.signal("-TERM");
    let (code, _, stderr) = tail.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_bad_log_filter_is_refused() {
    let (code, _, stderr) = Spawned::start(&["--log-level", "main=loud", "check", "x.toml"])
        .finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--log-level \"main=loud\""), "{stderr}");
}
