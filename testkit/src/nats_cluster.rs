//! A 3-node `nats-server` cluster with JetStream, started for one test on free loopback
//! ports: client, route and monitoring port per node, a server name (`n0`, `n1`, `n2`) and a
//! JetStream store of its own. Each node can be killed (-9), frozen (SIGSTOP), thawed and
//! restarted on the same ports with the same store.
//!
//! [`NatsCluster::start`] returns once every node has routes to the two others and
//! JetStream has a meta leader: publishes made right after the routes form (before the meta
//! leader is elected) fail with "JetStream system temporarily unavailable".

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::server::{broker_binary, free_ports, ServerProcess};

/// The nodes of a [`NatsCluster`].
pub const NODES: usize = 3;

/// One node of a [`NatsCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    name: String,
    monitor_port: u16,
    process: ServerProcess,
    // Holds the config file; the store lives in the process's own dir.
    _conf_dir: tempfile::TempDir,
}

impl ClusterNode {
    /// Its server name (`n0`, `n1`, `n2`): what `cluster.leader` and `server_info().server_name`
    /// show.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://127.0.0.1:<client port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The HTTP monitoring port (`/connz`, `/routez`, `/jsz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Kills it with SIGKILL (its store stays for [`ClusterNode::restart`]).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes it (SIGSTOP): its sockets stay open, nothing answers.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Starts it again on the same ports with the same store (kills it first if it runs).
    /// Returns once its client port listens; [`NatsCluster::wait_ready`] waits for the
    /// cluster.
    pub fn restart(&mut self) {
        self.process.restart();
    }

    /// Whether the process runs (not killed).
    pub fn is_running(&self) -> bool {
        self.process.pid().is_some()
    }

    /// What it logged.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// GETs a monitoring endpoint (e.g. `/connz`) and returns the body, or `None` when the
    /// node does not answer within 2 s (killed or frozen).
    pub fn monitor(&self, path: &str) -> Option<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// A NATS request from a throwaway raw-protocol connection to this node: the reply's
    /// payload, or `None` when the node does not answer within `timeout`.
    pub fn request(&self, subject: &str, payload: &str, timeout: Duration) -> Option<String> {
        raw_request(self.port(), subject, payload, timeout)
    }
}

/// A running 3-node cluster owned by a test; every node is killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
}

impl NatsCluster {
    /// Starts the cluster and waits (up to 30 s) until it has formed and JetStream has a
    /// meta leader, or returns `None` (after printing `SKIPPED`) when `nats-server` is not
    /// installed.
    ///
    /// # Panics
    /// When a node does not start or the cluster does not form (a test harness).
    pub fn start(test: &str) -> Option<NatsCluster> {
        let binary = broker_binary("nats-server", test)?;
        Some(Self::start_binary(&binary))
    }

    fn start_binary(binary: &Path) -> NatsCluster {
        let ports: [u16; 3 * NODES] = free_ports();
        let client = |i: usize| ports[i];
        let route = |i: usize| ports[NODES + i];
        let monitor = |i: usize| ports[2 * NODES + i];
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let routes: Vec<String> = (0..NODES)
                .filter(|&j| j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", route(j)))
                .collect();
            let conf = format!(
                "server_name: n{i}\n\
                 max_payload: 8388608\n\
                 cluster {{\n  name: busway\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                route(i),
                routes.join(", ")
            );
            let conf_dir = tempfile::tempdir().expect("temp dir for nats.conf");
            let conf_path = conf_dir.path().join("nats.conf");
            std::fs::write(&conf_path, conf).expect("write nats.conf");
            let args = vec![
                "-a".to_string(),
                "127.0.0.1".to_string(),
                "-p".to_string(),
                client(i).to_string(),
                "-m".to_string(),
                monitor(i).to_string(),
                "-js".to_string(),
                "-sd".to_string(),
                "{dir}/js".to_string(),
                "-c".to_string(),
                conf_path.display().to_string(),
            ];
            nodes.push(ClusterNode {
                name: format!("n{i}"),
                monitor_port: monitor(i),
                process: ServerProcess::start(binary, args, client(i)),
                _conf_dir: conf_dir,
            });
        }
        let cluster = NatsCluster { nodes };
        if let Err(why) = cluster.wait_ready(Duration::from_secs(30)) {
            panic!("the NATS cluster did not form: {why}\n{}", cluster.logs());
        }
        cluster
    }

    /// The three client URLs, comma-separated (busway's `url` for a cluster).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i` (0, 1 or 2).
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn node(&mut self, i: usize) -> &mut ClusterNode {
        &mut self.nodes[i]
    }

    /// The nodes.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The index of the node listening on client `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// The index of the node named `name`.
    pub fn index_of_name(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Waits until every running node has a route to each other running node and
    /// JetStream answers `$JS.API.INFO` with a meta leader in place.
    ///
    /// # Errors
    /// What was still missing when `limit` passed.
    pub fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        let running: Vec<&ClusterNode> = self.nodes.iter().filter(|n| n.is_running()).collect();
        let mut missing;
        loop {
            missing = String::new();
            for n in &running {
                let routes = n
                    .monitor("/routez")
                    .and_then(|b| json_number(&b, "num_routes"))
                    .unwrap_or(0);
                if routes < running.len() as u64 - 1 {
                    missing = format!("{} has {routes} routes", n.name);
                    break;
                }
                let meta = n
                    .monitor("/jsz")
                    .and_then(|b| json_string(after(&b, "\"meta_cluster\"")?, "leader"))
                    .unwrap_or_default();
                if meta.is_empty() {
                    missing = format!("{} sees no JetStream meta leader", n.name);
                    break;
                }
                match n.request("$JS.API.INFO", "", Duration::from_secs(2)) {
                    Some(reply) if !reply.contains("\"error\"") => {}
                    other => {
                        missing = format!("{}: $JS.API.INFO answered {other:?}", n.name);
                        break;
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(missing);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server name of `stream`'s current leader (`$JS.API.STREAM.INFO.<stream>` →
    /// `cluster.leader`), asked of each running node in turn; `None` while there is none.
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        self.nodes.iter().filter(|n| n.is_running()).find_map(|n| {
            let reply = n.request(&subject, "", Duration::from_secs(1))?;
            json_string(after(&reply, "\"cluster\"")?, "leader").filter(|l| !l.is_empty())
        })
    }

    /// The index of `stream`'s leader (see [`NatsCluster::stream_leader`]).
    pub fn stream_leader_index(&self, stream: &str) -> Option<usize> {
        self.index_of_name(&self.stream_leader(stream)?)
    }

    /// Waits up to `limit` for `stream` to have a leader other than node `not`; its index.
    pub fn wait_stream_leader(
        &self,
        stream: &str,
        not: Option<usize>,
        limit: Duration,
    ) -> Option<usize> {
        let start = Instant::now();
        while start.elapsed() < limit {
            match self.stream_leader_index(stream) {
                Some(i) if Some(i) != not => return Some(i),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        None
    }

    /// `state.messages` of `stream` (`$JS.API.STREAM.INFO.<stream>`), from the first node
    /// that answers.
    pub fn stream_messages(&self, stream: &str) -> Option<u64> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        self.nodes.iter().filter(|n| n.is_running()).find_map(|n| {
            let reply = n.request(&subject, "", Duration::from_secs(2))?;
            json_number(after(&reply, "\"state\"")?, "messages")
        })
    }

    /// Kills every node (-9), then starts them all again on the same ports and stores and
    /// waits (up to 30 s) for the cluster to form.
    ///
    /// # Errors
    /// What was still missing when the cluster did not form.
    pub fn restart_all(&mut self) -> Result<(), String> {
        for n in &mut self.nodes {
            n.kill();
        }
        self.start_all()
    }

    /// Starts every node that is not running and waits (up to 30 s) for the cluster.
    ///
    /// # Errors
    /// What was still missing when the cluster did not form.
    pub fn start_all(&mut self) -> Result<(), String> {
        for n in &mut self.nodes {
            if !n.is_running() {
                n.restart();
            }
        }
        self.wait_ready(Duration::from_secs(30))
    }

    /// Every node's log, each under its name.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect()
    }
}

/// The text after the first `key` in `json`.
fn after<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    json.find(key).map(|at| &json[at + key.len()..])
}

/// The first `"key": <number>` in `json`.
pub(crate) fn json_number(json: &str, key: &str) -> Option<u64> {
    let rest = after(json, &format!("\"{key}\""))?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The first `"key": "<string>"` in `json` (no escapes inside).
pub(crate) fn json_string(json: &str, key: &str) -> Option<String> {
    let rest = after(json, &format!("\"{key}\""))?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    rest.split_once('"').map(|(s, _)| s.to_string())
}

/// One request over the plain NATS protocol (no client library in the test kit): the reply's
/// payload, or `None` on no answer within `timeout`.
fn raw_request(port: u16, subject: &str, payload: &str, timeout: Duration) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    let inbox = "_INBOX.busway_testkit";
    write!(
        s,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"name\":\"busway-testkit\"}}\r\n\
         SUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n{payload}\r\nPING\r\n",
        payload.len()
    )
    .ok()?;
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while start.elapsed() < timeout {
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
        if let Some(body) = msg_payload(&buf) {
            return Some(body);
        }
    }
    None
}

/// The payload of the first complete `MSG <subject> <sid> <len>` in `buf`.
fn msg_payload(buf: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(buf);
    let at = text.find("MSG ")?;
    let (line, rest) = text[at..].split_once("\r\n")?;
    let len: usize = line.split_whitespace().last()?.parse().ok()?;
    let body = rest.as_bytes().get(..len)?;
    Some(String::from_utf8_lossy(body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_and_strings() {
        let j = r#"{"cluster":{"name":"busway","leader":"n1"},"state":{"messages": 42}}"#;
        assert_eq!(
            json_string(after(j, "\"cluster\"").unwrap(), "leader").as_deref(),
            Some("n1")
        );
        assert_eq!(
            json_number(after(j, "\"state\"").unwrap(), "messages"),
            Some(42)
        );
        assert_eq!(
            msg_payload(b"INFO {}\r\nMSG _INBOX.x 1 2\r\nhi\r\n").as_deref(),
            Some("hi")
        );
        assert_eq!(msg_payload(b"MSG _INBOX.x 1 5\r\nhi"), None);
    }

    #[test]
    fn forms_and_finds_a_stream_leader() {
        let Some(mut cluster) = NatsCluster::start("forms_and_finds_a_stream_leader") else {
            return;
        };
        assert_eq!(cluster.urls().split(',').count(), 3);
        let create = r#"{"name":"T","subjects":["t.>"],"num_replicas":3}"#;
        let reply = cluster
            .node(0)
            .request("$JS.API.STREAM.CREATE.T", create, Duration::from_secs(5))
            .expect("stream create answered");
        assert!(!reply.contains("\"error\""), "{reply}");
        let leader = cluster
            .wait_stream_leader("T", None, Duration::from_secs(10))
            .expect("a leader");
        cluster.node(leader).kill();
        let next = cluster
            .wait_stream_leader("T", Some(leader), Duration::from_secs(20))
            .expect("a new leader");
        assert_ne!(next, leader);
        cluster.node(leader).restart();
        cluster.wait_ready(Duration::from_secs(30)).unwrap();
    }
}
