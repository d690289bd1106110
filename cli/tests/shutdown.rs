//! Ctrl-C (SIGINT) in `busway demo` on Redis streams: the run stops the graceful way (feed
//! stopped, engines drained, router flushed and closed), the process exits 0, and every
//! publish the demo reports as Ok is on the broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use busway_testkit::redis::RedisServer;

/// A `busway` process with its stdout and stderr in files.
struct Spawned {
    child: Child,
    dir: tempfile::TempDir,
}

impl Spawned {
    fn start(args: &[&str], env: &[(String, String)]) -> Spawned {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_busway"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BUSWAY_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        Spawned {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    fn wait_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.read("stderr").contains(needle) {
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no {needle:?} on stderr:\n{}", self.read("stderr"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -INT failed");
    }

    /// Waits for the exit (90 s at most): (exit code, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                self.child.wait().unwrap();
                panic!("busway did not finish:\n{}", self.read("stderr"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), self.read("stdout"), self.read("stderr"))
    }
}

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
    let mut demo = Spawned::start(
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
    demo.wait_stderr("busway: demo running");
    std::thread::sleep(Duration::from_secs(2));
    demo.interrupt();
    let (code, stdout, stderr) = demo.finish();
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("(stopped by Ctrl-C)"), "{stdout}");
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
