//! What the CLI's integration tests share: a `busway` process left running.

use std::ffi::OsStr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `busway` process left running, its stdout and stderr going to files. `BUSWAY_*`
/// variables of the test's own environment are not passed on.
pub(crate) struct Spawned {
    child: Child,
    dir: tempfile::TempDir,
}

#[allow(dead_code)] // each test binary uses a part
impl Spawned {
    pub(crate) fn start<A: AsRef<OsStr>>(args: &[A]) -> Spawned {
        Spawned::start_env(args, &[])
    }

    /// Starts it with `env` set on top.
    pub(crate) fn start_env<A: AsRef<OsStr>>(args: &[A], env: &[(String, String)]) -> Spawned {
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

    /// What it wrote so far to `stdout` or `stderr`.
    pub(crate) fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    /// Waits until stderr contains `needle`; panics (killing the process) after `limit` or
    /// when the process ended without writing it.
    pub(crate) fn wait_stderr(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.read("stderr").contains(needle) {
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no {needle:?} on stderr:\n{}", self.read("stderr"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGINT, as Ctrl-C in a terminal does.
    pub(crate) fn interrupt(&self) {
        self.signal("-INT");
    }

    /// Sends a signal (`kill`'s option: `-INT`, `-HUP`...).
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits for the exit (`limit` at most, then kills it and panics): (exit code, stdout,
    /// stderr).
    pub(crate) fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                self.child.wait().unwrap();
                panic!(
                    "busway did not finish within {limit:?}:\n{}",
                    self.read("stderr")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), self.read("stdout"), self.read("stderr"))
    }
}
