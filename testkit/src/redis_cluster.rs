//! A Redis Cluster started for one test on free loopback ports: 3 primaries and 3 replicas
//! (`redis-server --cluster-enabled yes`, joined with `redis-cli --cluster create
//! --cluster-replicas 1 --cluster-yes`), `cluster-node-timeout` 1 s so a replica takes over
//! a killed primary within seconds. Every node can be killed (-9), frozen (SIGSTOP), thawed
//! and restarted on its ports with its `nodes.conf`.
//!
//! ```no_run
//! let Some(mut cluster) = busway_testkit::redis_cluster::RedisCluster::start("my_test") else { return };
//! let url = cluster.url(); // redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,...
//! let i = cluster.primary_for_slot(0).unwrap();
//! cluster.node(i).kill();
//! cluster.wait_ok(std::time::Duration::from_secs(30)).unwrap();
//! ```

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis::{redis_cli, server_args};
use crate::redis_sentinel::cli;
use crate::server::{broker_binary, free_ports, ServerProcess};

/// Nodes: 3 primaries, each with one replica.
pub const NODES: usize = 6;

/// `cluster-node-timeout`: how long a primary must be unreachable before it is failed over.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// A running cluster owned by a test; every node is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    port: u16,
    primary: bool,
    failed: bool,
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts 6 nodes, joins them into a cluster and waits (up to 60 s) until every node
    /// says `cluster_state:ok`; `None` (after printing `SKIPPED`) when `redis-server` is not
    /// installed (a panic under `BUSWAY_REQUIRE_BROKERS=1`).
    ///
    /// # Panics
    /// When a node does not start or the cluster does not form (a test harness).
    pub fn start(test: &str) -> Option<RedisCluster> {
        let binary = broker_binary("redis-server", test)?;
        Some(Self::start_binary(&binary))
    }

    fn start_binary(binary: &Path) -> RedisCluster {
        // A client port and a cluster bus port per node (the default bus port, client port +
        // 10000, may be taken or out of range).
        let ports: [u16; 2 * NODES] = free_ports();
        let nodes: Vec<ServerProcess> = (0..NODES)
            .map(|i| {
                let args = server_args(
                    ports[i],
                    &[
                        "--cluster-port",
                        &ports[NODES + i].to_string(),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "{dir}/nodes.conf",
                        "--cluster-node-timeout",
                        &NODE_TIMEOUT.as_millis().to_string(),
                        // Replicas sync at once (not after the default 5 s diskless delay), and
                        // a replica may always take over (a test kills primaries soon after the
                        // start).
                        "--repl-diskless-sync-delay",
                        "0",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                );
                ServerProcess::start(binary, args, ports[i])
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let mut create = Command::new(redis_cli());
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Err(why) = cluster.wait_ok(Duration::from_secs(60)) {
            panic!("the cluster did not form: {why}\n{}", cluster.logs());
        }
        cluster
    }

    /// Waits until every running node says `cluster_state:ok` and agrees that primaries
    /// that are not failed serve all 16384 slots, and every running replica is in sync.
    ///
    /// # Errors
    /// What was still missing after `limit`.
    pub fn wait_ok(&self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let why = self.not_ok();
            match why {
                None => return Ok(start.elapsed()),
                Some(why) if start.elapsed() > limit => return Err(why),
                Some(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn not_ok(&self) -> Option<String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.pid().is_none() {
                continue;
            }
            let info = cli(n.port(), &["CLUSTER", "INFO"]);
            if !info.contains("cluster_state:ok") {
                return Some(format!("node {i} is not ok: {info:?}"));
            }
            let replication = cli(n.port(), &["INFO", "replication"]);
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return Some(format!("replica {i} is not in sync with its primary"));
            }
            let lines = self.cluster_nodes(i);
            let served: u32 = lines
                .iter()
                .filter(|l| l.primary && !l.failed)
                .flat_map(|l| l.slots.iter())
                .map(|(a, b)| u32::from(b - a) + 1)
                .sum();
            if served != 16384 {
                return Some(format!("node {i} sees {served} of 16384 slots served"));
            }
        }
        None
    }

    /// `CLUSTER NODES` as node `i` sees it.
    fn cluster_nodes(&self, i: usize) -> Vec<NodeLine> {
        cli(self.nodes[i].port(), &["CLUSTER", "NODES"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let addr = f.get(1)?;
                let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                Some(NodeLine {
                    port,
                    primary: flags.contains("master"),
                    failed: flags.contains("fail"),
                    slots,
                })
            })
            .collect()
    }

    /// The index of the node that serves `slot` as a primary, as the first running node
    /// sees it.
    pub fn primary_for_slot(&self, slot: u16) -> Option<usize> {
        let viewer = self.nodes.iter().position(|n| n.pid().is_some())?;
        let line = self.cluster_nodes(viewer).into_iter().find(|l| {
            l.primary && !l.failed && l.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
        })?;
        self.nodes.iter().position(|n| n.port() == line.port)
    }

    /// Waits until a node other than `old` serves `slot` as a primary and the cluster is ok
    /// again; returns how long that took.
    ///
    /// # Errors
    /// When that did not happen within `limit`.
    pub fn wait_failover(
        &self,
        old: usize,
        slot: u16,
        limit: Duration,
    ) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if matches!(self.primary_for_slot(slot), Some(p) if p != old) && self.not_ok().is_none()
            {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "slot {slot} is still on node {old}, or the cluster is not ok, after {limit:?}"
        ))
    }

    /// The indexes of the nodes that are primaries serving slots (not failed), as the first
    /// running node sees it.
    pub fn primaries(&self) -> Vec<usize> {
        let Some(viewer) = self.nodes.iter().position(|n| n.pid().is_some()) else {
            return Vec::new();
        };
        self.cluster_nodes(viewer)
            .into_iter()
            .filter(|l| l.primary && !l.failed && !l.slots.is_empty())
            .filter_map(|l| self.nodes.iter().position(|n| n.port() == l.port))
            .collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a running node).
    pub fn slot(&self, key: &str) -> Option<u16> {
        let n = self.nodes.iter().find(|n| n.pid().is_some())?;
        cli(n.port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .ok()
    }

    /// `redis+cluster://127.0.0.1:<p1>,...` with every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Node `i` (0..6).
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn node(&mut self, i: usize) -> &mut ServerProcess {
        &mut self.nodes[i]
    }

    /// The nodes.
    pub fn nodes(&self) -> &[ServerProcess] {
        &self.nodes
    }

    /// Runs `redis-cli -p <node i's port> args...` (at most 2 s) and returns its stdout.
    pub fn node_cli(&self, i: usize, args: &[&str]) -> String {
        cli(self.nodes[i].port(), args)
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            out.push_str(&format!("--- node {i} (port {}):\n{}\n", n.port(), n.log()));
        }
        out
    }
}
