//! A `redis-server` started for one test on a free loopback port, in a temp dir.
//!
//! ```no_run
//! let Some(server) = busway_testkit::redis::RedisServer::start("my_test") else { return };
//! let url = server.url(); // redis://127.0.0.1:<port>
//! ```

use std::path::PathBuf;
use std::process::Command;

use crate::server::{broker_binary, free_port, ServerProcess};

/// The arguments of a private `redis-server` on `127.0.0.1:port` that keeps nothing on disk
/// (no RDB snapshots, no AOF) and whose files go to its own directory, followed by `extra`
/// (a later `--appendonly yes` overrides the default, as in a config file).
pub fn server_args(port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    [
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        "{dir}",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// A running `redis-server` owned by a test; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
    password: Option<String>,
    aof: bool,
}

impl RedisServer {
    /// Starts a server without persistence. `None` (after printing SKIPPED) when
    /// `redis-server` is not installed.
    pub fn start(test: &str) -> Option<RedisServer> {
        Self::start_with(test, false, None)
    }

    /// Starts a server with the append-only file on (`appendfsync always`), so a kill -9
    /// keeps every acknowledged write across a restart.
    pub fn start_with_aof(test: &str) -> Option<RedisServer> {
        Self::start_with(test, true, None)
    }

    /// Starts a server that requires `password` for the `default` user (`requirepass`).
    pub fn start_with_password(test: &str, password: &str) -> Option<RedisServer> {
        Self::start_with(test, false, Some(password.to_string()))
    }

    fn start_with(test: &str, aof: bool, password: Option<String>) -> Option<RedisServer> {
        let binary = broker_binary("redis-server", test)?;
        let port = free_port();
        let aof_args: &[&str] = if aof {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &[]
        };
        let mut args = server_args(port, aof_args);
        if let Some(p) = &password {
            args.extend(["--requirepass".to_string(), p.clone()]);
        }
        let process = ServerProcess::start(&binary, args, port);
        Some(RedisServer {
            process,
            password,
            aof,
        })
    }

    /// Whether an acknowledged write survives a kill -9 and restart: true only for
    /// [`RedisServer::start_with_aof`] (every other server keeps nothing on disk). A fault test
    /// that counts losses across a restart of a stream bus needs a persisting server.
    pub fn persists(&self) -> bool {
        self.aof
    }

    /// `redis://127.0.0.1:<port>` (with the password when the server requires one).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port()),
            None => format!("redis://127.0.0.1:{}", self.port()),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The underlying process (log, dir, pid).
    pub fn process(&self) -> &ServerProcess {
        &self.process
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes it (SIGSTOP).
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Starts it again on the same port and dir (an AOF server reloads its data).
    pub fn restart(&mut self) {
        self.process.restart();
    }

    /// Runs `redis-cli -p <port> args...` and returns its stdout (panics when it fails to run).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .cli_command(args)
            .output()
            .expect("run redis-cli (is it installed beside redis-server?)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A `redis-cli -p <port> [-a password] args...` command, for tests that spawn it.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(redis_cli());
        cmd.arg("-p").arg(self.port().to_string());
        if let Some(p) = &self.password {
            cmd.arg("--no-auth-warning").arg("-a").arg(p);
        }
        cmd.args(args);
        cmd
    }
}

pub(crate) fn redis_cli() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("redis-cli"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}
