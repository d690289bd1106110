//! A broker process started for one test: free loopback port, temp dir, killed on drop, and
//! able to be killed (-9), paused (SIGSTOP / SIGCONT) and restarted on the same port.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free loopback ports (held open together while they are picked, so the
/// kernel cannot hand out the same one twice).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .expect("bind an ephemeral port on 127.0.0.1")
        })
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    })
}

/// Finds a broker binary (`redis-server`, `nats-server`) on PATH or in `/usr/sbin`.
///
/// When it is missing, prints `SKIPPED <test>: <binary> not found` and returns `None`, so the
/// caller returns early; with `BUSWAY_REQUIRE_BROKERS=1` it panics instead, so CI cannot pass
/// without running broker tests.
pub fn broker_binary(binary: &str, test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("BUSWAY_REQUIRE_BROKERS").as_deref() == Ok("1") {
            panic!("{test}: {binary} not found on PATH and BUSWAY_REQUIRE_BROKERS=1");
        }
        eprintln!("SKIPPED {test}: {binary} not found on PATH");
    }
    found
}

/// A running broker process owned by a test.
#[derive(Debug)]
pub struct ServerProcess {
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `program args...` in a fresh temp dir (passed to `args` as `{dir}`) and waits
    /// until `port` on 127.0.0.1 accepts connections.
    ///
    /// # Panics
    /// When the process cannot start or does not listen within 10 s (a test harness).
    pub fn start(program: &Path, args: Vec<String>, port: u16) -> ServerProcess {
        let dir = tempfile::tempdir().expect("temp dir for the broker");
        let mut server = ServerProcess {
            program: program.to_path_buf(),
            args,
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir = self.dir.path().display().to_string();
        let args: Vec<String> = self.args.iter().map(|a| a.replace("{dir}", &dir)).collect();
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let child = Command::new(&self.program)
            .args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.child = Some(child);
        self.wait_listening(Duration::from_secs(10));
    }

    fn wait_listening(&mut self, limit: Duration) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        while start.elapsed() < limit {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "{} exited with {status} before listening on {addr}; log:\n{}",
                    self.program.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not listen on {addr} within {limit:?}",
            self.program.display()
        );
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// What the server wrote to stdout/stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        }
    }

    /// Kills it with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Starts it again on the same port and dir (kills it first if it still runs).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}
