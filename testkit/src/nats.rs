//! A `nats-server` (with JetStream) started for one test on a free loopback port.

use std::path::Path;

use crate::server::{broker_binary, free_ports, ServerProcess};

/// How to start a [`NatsServer`]: auth and limits written to its config file.
#[derive(Debug, Clone, Default)]
pub struct NatsServerOptions {
    /// Require this token (`authorization { token }`).
    pub token: Option<String>,
    /// Require this user and password (`authorization { user, password }`).
    pub user_password: Option<(String, String)>,
    /// `max_payload` in bytes; 8 MiB when unset (NATS's own default is 1 MiB including
    /// headers, too small for the conformance suite's 1 MiB payloads).
    pub max_payload: Option<usize>,
    /// More config text appended as is (e.g. a `tls { ... }` block).
    pub extra_conf: Option<String>,
}

/// A running `nats-server -js` owned by a test; killed on drop. The JetStream store lives in
/// the server's temp dir, so it survives [`NatsServer::restart`].
#[derive(Debug)]
pub struct NatsServer {
    process: ServerProcess,
    monitor_port: u16,
    // Holds the config file; the server's own dir only exists once it runs.
    _conf_dir: tempfile::TempDir,
}

impl NatsServer {
    /// Whether JetStream's acknowledged messages survive a kill -9 and restart: always, for
    /// streams with file storage (the store lives in the server's own dir, kept across
    /// [`NatsServer::restart`]); core NATS messages are never stored.
    pub fn persists(&self) -> bool {
        true
    }

    /// Starts a server with default options, or returns `None` (after printing `SKIPPED`)
    /// when `nats-server` is not installed.
    pub fn start(test: &str) -> Option<NatsServer> {
        Self::start_with(test, NatsServerOptions::default())
    }

    /// Starts a server with `options`; `None` when `nats-server` is not installed.
    ///
    /// # Panics
    /// When the server does not start (a test harness).
    pub fn start_with(test: &str, options: NatsServerOptions) -> Option<NatsServer> {
        let binary = broker_binary("nats-server", test)?;
        Some(Self::start_binary(&binary, options))
    }

    fn start_binary(binary: &Path, options: NatsServerOptions) -> NatsServer {
        let [port, monitor_port] = free_ports();
        let mut conf = format!(
            "max_payload: {}\n",
            options.max_payload.unwrap_or(8 * 1024 * 1024)
        );
        if let Some(token) = &options.token {
            conf.push_str(&format!("authorization {{\n  token: \"{token}\"\n}}\n"));
        }
        if let Some((user, password)) = &options.user_password {
            conf.push_str(&format!(
                "authorization {{\n  user: \"{user}\"\n  password: \"{password}\"\n}}\n"
            ));
        }
        if let Some(extra) = &options.extra_conf {
            conf.push_str(extra);
            conf.push('\n');
        }
        let conf_dir = tempfile::tempdir().expect("temp dir for nats.conf");
        let conf_path = conf_dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf).expect("write nats.conf");
        let args = vec![
            "-a".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
            "-js".to_string(),
            "-sd".to_string(),
            "{dir}/js".to_string(),
            "-c".to_string(),
            conf_path.display().to_string(),
            "-m".to_string(),
            monitor_port.to_string(),
        ];
        let process = ServerProcess::start(binary, args, port);
        NatsServer {
            process,
            monitor_port,
            _conf_dir: conf_dir,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }

    /// The HTTP monitoring port (`/connz`, `/varz`, `/jsz` on 127.0.0.1).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// GETs a monitoring endpoint (e.g. `/connz`) and returns the body (JSON).
    ///
    /// # Panics
    /// When the server does not answer (a test harness).
    pub fn monitor(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.monitor_port))
            .expect("connect to the NATS monitoring port");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok();
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read monitoring answer");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(out)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The underlying process (kill, pause, resume, restart, log).
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same JetStream store.
    pub fn restart(&mut self) {
        self.process.restart();
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
