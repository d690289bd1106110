//! A Redis Sentinel set started for one test on free loopback ports: a primary, one replica
//! and three sentinels (`redis-server --sentinel`, quorum 2) monitoring it as `mymaster`,
//! with a short `down-after-milliseconds` (1 s) and `failover-timeout` (3 s) so a failover
//! takes seconds. Every process can be killed (-9), frozen (SIGSTOP), thawed and restarted on
//! its port.
//!
//! ```no_run
//! let Some(mut set) = busway_testkit::redis_sentinel::SentinelSet::start("my_test") else { return };
//! let url = set.url(); // redis+sentinel://127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>/mymaster
//! let primary = set.primary().unwrap();
//! set.node(primary).kill();
//! let took = set.wait_failover(primary, std::time::Duration::from_secs(30)).unwrap();
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis::{redis_cli, server_args};
use crate::server::{broker_binary, free_ports, ServerProcess};

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "mymaster";

/// `down-after-milliseconds`: how long the primary must be silent before a sentinel
/// calls it down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// `failover-timeout`, milliseconds.
const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// Data nodes (the primary and its replica) and sentinels.
const NODES: usize = 2;
const SENTINELS: usize = 3;

/// A running Sentinel set owned by a test; every process is killed on drop.
#[derive(Debug)]
pub struct SentinelSet {
    nodes: Vec<ServerProcess>,
    sentinels: Vec<ServerProcess>,
    // Holds the sentinels' config files (each sentinel rewrites its own).
    _conf_dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Starts the set and waits (up to 30 s) until the replica is in sync and every sentinel
    /// knows the replica and the two other sentinels (before that a failover cannot
    /// happen), or returns `None` (after printing `SKIPPED`) when `redis-server` is not
    /// installed (a panic under `BUSWAY_REQUIRE_BROKERS=1`).
    ///
    /// # Panics
    /// When a process does not start or the set does not form (a test harness).
    pub fn start(test: &str) -> Option<SentinelSet> {
        let binary = broker_binary("redis-server", test)?;
        Some(Self::start_binary(&binary))
    }

    fn start_binary(binary: &Path) -> SentinelSet {
        let ports: [u16; NODES + SENTINELS] = free_ports();
        let node_args = |port: u16, replica_of: Option<u16>| match replica_of {
            Some(p) => server_args(port, &["--replicaof", "127.0.0.1", &p.to_string()]),
            None => server_args(port, &[]),
        };
        let nodes = vec![
            ServerProcess::start(binary, node_args(ports[0], None), ports[0]),
            ServerProcess::start(binary, node_args(ports[1], Some(ports[0])), ports[1]),
        ];
        let conf_dir = tempfile::tempdir().expect("temp dir for sentinel.conf");
        let sentinels = (0..SENTINELS)
            .map(|i| {
                let port = ports[NODES + i];
                let conf = format!(
                    "port {port}\n\
                     bind 127.0.0.1\n\
                     sentinel monitor {MASTER} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER} {}\n\
                     sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    ports[0],
                    DOWN_AFTER.as_millis()
                );
                let path = conf_dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(&path, conf).expect("write sentinel.conf");
                let args = vec![
                    path.display().to_string(),
                    "--sentinel".to_string(),
                    "--dir".to_string(),
                    "{dir}".to_string(),
                ];
                ServerProcess::start(binary, args, port)
            })
            .collect();
        let set = SentinelSet {
            nodes,
            sentinels,
            _conf_dir: conf_dir,
        };
        if let Err(why) = set.wait_ready(Duration::from_secs(30)) {
            panic!("the Sentinel set did not form: {why}\n{}", set.logs());
        }
        set
    }

    /// Waits until some node is a primary with an in-sync replica, and every running
    /// sentinel names it with one replica and two other sentinels.
    ///
    /// # Errors
    /// What was still missing after `limit`.
    pub fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let why = match self.not_ready() {
                None => return Ok(()),
                Some(why) => why,
            };
            if start.elapsed() > limit {
                return Err(why);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn not_ready(&self) -> Option<String> {
        let Some(primary) = self.primary() else {
            return Some("no sentinel names a primary".into());
        };
        let replicas = (0..NODES).filter(|&i| i != primary);
        for r in replicas {
            let info = self.node_cli(r, &["INFO", "replication"]);
            if !info.contains("master_link_status:up") {
                return Some(format!("node {r} is not in sync with node {primary}"));
            }
        }
        for (i, s) in self.sentinels.iter().enumerate() {
            if s.pid().is_none() {
                continue;
            }
            let out = cli(s.port(), &["SENTINEL", "master", MASTER]);
            let field = |k: &str| {
                let mut lines = out.lines();
                lines.find(|l| l.trim() == k)?;
                lines.next().map(|v| v.trim().to_string())
            };
            if field("num-slaves").as_deref() != Some("1")
                || field("num-other-sentinels").as_deref() != Some("2")
                || field("flags").as_deref() != Some("master")
                || field("port").and_then(|p| p.parse().ok()) != Some(self.nodes[primary].port())
            {
                return Some(format!(
                    "sentinel {i} does not see the whole set yet: {out:?}"
                ));
            }
        }
        None
    }

    /// `redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,127.0.0.1:<s3>/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// Data node `i` (0 starts as the primary, 1 as its replica).
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn node(&mut self, i: usize) -> &mut ServerProcess {
        &mut self.nodes[i]
    }

    /// The data nodes.
    pub fn nodes(&self) -> &[ServerProcess] {
        &self.nodes
    }

    /// Sentinel `i` (0, 1 or 2).
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn sentinel(&mut self, i: usize) -> &mut ServerProcess {
        &mut self.sentinels[i]
    }

    /// `redis://127.0.0.1:<port>` of data node `i`.
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].port())
    }

    /// The index of the data node the first answering sentinel names as the primary, when
    /// that node says (`ROLE`) it is one.
    pub fn primary(&self) -> Option<usize> {
        let port = self.sentinels.iter().find_map(|s| {
            // A killed sentinel is skipped.
            s.pid()?;
            let out = cli(s.port(), &["SENTINEL", "get-master-addr-by-name", MASTER]);
            out.lines().nth(1)?.trim().parse::<u16>().ok()
        })?;
        let i = self.nodes.iter().position(|n| n.port() == port)?;
        let role = self.node_cli(i, &["ROLE"]);
        (role.lines().next().map(str::trim) == Some("master")).then_some(i)
    }

    /// Waits until a node other than `old` is the primary; returns how long that took.
    ///
    /// # Errors
    /// When no failover happened within `limit`.
    pub fn wait_failover(&self, old: usize, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if matches!(self.primary(), Some(p) if p != old) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "node {old} is still (or again) the primary after {limit:?}"
        ))
    }

    /// Runs `redis-cli -p <node i's port> args...` (at most 2 s) and returns its stdout.
    pub fn node_cli(&self, i: usize, args: &[&str]) -> String {
        cli(self.nodes[i].port(), args)
    }

    /// Every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            out.push_str(&format!("--- node {i} (port {}):\n{}\n", n.port(), n.log()));
        }
        for (i, s) in self.sentinels.iter().enumerate() {
            out.push_str(&format!(
                "--- sentinel {i} (port {}):\n{}\n",
                s.port(),
                s.log()
            ));
        }
        out
    }
}

/// `redis-cli -p port args...` under a 2 s limit (a frozen server accepts the connection and
/// never answers); its stdout, empty when it failed.
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    Command::new("timeout")
        .arg("2")
        .arg(redis_cli())
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
