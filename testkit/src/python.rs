//! Foreign clients for the mixed-fleet tests: the Python scripts in `testkit/python/` (a
//! platform engine on redis-py, a JetStream engine on nats-py), run with the interpreter of
//! the venv `.ci/run` makes (`.ci/venv`, named by `BUSWAY_PYTHON`).
//!
//! ```no_run
//! let Some(python) = busway_testkit::python::Python::find("my_test") else { return };
//! let out = python.run("nautilus_redis.py", &["produce", "--port", "6379", "--key", "k", "--count", "1"]);
//! assert!(out.status.success());
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A Python interpreter that imports `redis` and `nats`.
#[derive(Debug, Clone)]
pub struct Python {
    program: PathBuf,
}

impl Python {
    /// `BUSWAY_PYTHON`, else `.ci/venv/bin/python` of the workspace, if it imports redis-py
    /// and nats-py.
    ///
    /// When there is none, prints `SKIPPED <test>: ...` and returns `None`, so the caller
    /// returns early; with `BUSWAY_REQUIRE_BROKERS=1` it panics instead, so CI cannot pass
    /// without running the foreign-client tests.
    pub fn find(test: &str) -> Option<Python> {
        let program = std::env::var_os("BUSWAY_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/venv/bin/python")
            });
        let works = Command::new(&program)
            .args(["-c", "import redis, nats"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return Some(Python { program });
        }
        let why = format!(
            "{} cannot import redis and nats (run .ci/run, or set BUSWAY_PYTHON to a Python with testkit/python/requirements.txt)",
            program.display()
        );
        if std::env::var("BUSWAY_REQUIRE_BROKERS").as_deref() == Ok("1") {
            panic!("{test}: {why} and BUSWAY_REQUIRE_BROKERS=1");
        }
        eprintln!("SKIPPED {test}: {why}");
        None
    }

    /// The path of a script in `testkit/python/`.
    pub fn script(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .join(name)
    }

    /// `python <script> args...`, its output piped.
    pub fn command(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg(Python::script(script))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a script to its end (at most 60 s, then it is killed) and returns its output.
    pub fn run(&self, script: &str, args: &[&str]) -> Output {
        self.spawn(script, args).wait(Duration::from_secs(60))
    }

    /// Starts a script; the returned guard kills it when dropped.
    pub fn spawn(&self, script: &str, args: &[&str]) -> Script {
        let mut child = self
            .command(script, args)
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        // Read as it comes, so a test can wait for a line (`ready`) while the script runs.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script {
            child: Some(child),
            lines,
            reader: Some(reader),
            seen: Vec::new(),
        }
    }
}

/// A running script, killed on drop.
#[derive(Debug)]
pub struct Script {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Lines taken by [`wait_for_line`](Self::wait_for_line), still part of the output.
    seen: Vec<String>,
}

impl Script {
    /// Waits (at most `limit`) for a stdout line equal to `want`; panics with the script's
    /// output when it does not come.
    pub fn wait_for_line(&mut self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return,
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let child = self.child.take().expect("running");
                    let out = finish(child, Duration::ZERO, &self.lines, &mut self.seen);
                    panic!(
                        "no line {want:?} within {limit:?}: {}\n{}",
                        String::from_utf8_lossy(&out.stderr),
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
        }
    }

    /// Waits (on a blocking thread, not the async runtime's) until the script prints
    /// `ready`: the line the scripts print once they have subscribed.
    pub async fn ready(mut self) -> Script {
        tokio::task::spawn_blocking(move || {
            self.wait_for_line("ready", Duration::from_secs(30));
            self
        })
        .await
        .expect("the wait for \"ready\" ran")
    }

    /// Waits for the script to end (killing it after `limit`) and returns its output (stdout
    /// without the lines [`wait_for_line`](Self::wait_for_line) waited for).
    pub fn wait(mut self, limit: Duration) -> Output {
        let child = self.child.take().expect("not waited yet");
        let out = finish(child, limit, &self.lines, &mut self.seen);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        out
    }

    /// Waits as [`wait`](Self::wait) without blocking the async runtime's thread.
    pub async fn finish(self, limit: Duration) -> Output {
        tokio::task::spawn_blocking(move || self.wait(limit))
            .await
            .expect("waiting for the script")
    }
}

/// Waits up to `limit` for `child` to end, kills it, and returns its output.
fn finish(
    mut child: Child,
    limit: Duration,
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
) -> Output {
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("script output");
    // The reader ends with stdout; take what it read.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        seen.push(line);
    }
    let mut stdout = seen.join("\n").into_bytes();
    if !stdout.is_empty() {
        stdout.push(b'\n');
    }
    Output { stdout, ..out }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A script's stdout lines, failing with its stderr when it did not succeed.
pub fn lines_of(what: &str, out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}
