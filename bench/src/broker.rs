//! The broker a bench runs against: a private one started on a free loopback port (the
//! default), or the one `--url` names; and its CPU time, for CPU seconds per million messages.

use std::path::PathBuf;

use busway::transport::redact_url;
use busway::{Error, ErrorKind, Result};
use busway_testkit::{free_port, ServerProcess};

use super::engine::client_err;
use super::Transport;

/// The broker of one bench run.
#[derive(Debug)]
pub(crate) struct Broker {
    transport: Transport,
    url: Option<String>,
    /// Set when this process started the broker: it dies with the bench.
    server: Option<ServerProcess>,
    /// nats-server's HTTP monitoring port (`/connz`), when this bench started it.
    monitor_port: Option<u16>,
    redis_info: Option<redis::aio::MultiplexedConnection>,
    /// A private 3-node NATS cluster this bench started (`--nats-cluster`).
    cluster: Option<busway_testkit::nats_cluster::NatsCluster>,
    /// A private Sentinel set this bench started (`--redis-sentinel`) and its primary's
    /// `redis://` URL, for the raw side.
    sentinel: Option<(busway_testkit::redis_sentinel::SentinelSet, String)>,
}

/// Finds a broker binary on PATH or in the sbin directories (where distributions put them).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Broker {
    /// Connects to `url`, or starts a private broker for `transport` when `url` is `None`.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the broker binary is missing, does not start, or the
    /// broker cannot be reached.
    pub(crate) async fn open(transport: Transport, url: Option<&str>) -> Result<Broker> {
        let (binary, args): (&str, &[&str]) = match transport {
            Transport::Memory => {
                return Ok(Broker {
                    transport,
                    url: None,
                    server: None,
                    monitor_port: None,
                    redis_info: None,
                    cluster: None,
                    sentinel: None,
                })
            }
            // Snapshots and the AOF off: they would charge disk work to the broker's CPU.
            // No pub/sub output-buffer limit: a subscriber that falls behind is measured,
            // not disconnected (on both sides alike).
            Transport::Redis => (
                "redis-server",
                &[
                    "--port",
                    "{port}",
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    "{dir}",
                    "--client-output-buffer-limit",
                    "pubsub 0 0 0",
                ],
            ),
            Transport::Nats => (
                "nats-server",
                &[
                    "-a",
                    "127.0.0.1",
                    "-p",
                    "{port}",
                    "-m",
                    "{mport}",
                    "-js",
                    "-sd",
                    "{dir}",
                ],
            ),
        };
        let mut monitor_port = None;
        let (url, server) = match url {
            Some(u) => (u.to_string(), None),
            None => {
                let program = find_binary(binary).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Connection,
                        format!(
                            "{binary} not found on PATH or in /usr/sbin: install it, or pass --url to use a running broker"
                        ),
                    )
                })?;
                let port = free_port();
                let mport = free_port();
                if transport == Transport::Nats {
                    monitor_port = Some(mport);
                }
                let args: Vec<String> = args
                    .iter()
                    .map(|a| {
                        a.replace("{port}", &port.to_string())
                            .replace("{mport}", &mport.to_string())
                    })
                    .collect();
                let server =
                    tokio::task::spawn_blocking(move || ServerProcess::start(&program, args, port))
                        .await
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Connection,
                                format!("could not start a private {binary}: {e}"),
                            )
                        })?;
                let scheme = match transport {
                    Transport::Redis => "redis",
                    _ => "nats",
                };
                (format!("{scheme}://127.0.0.1:{port}"), Some(server))
            }
        };
        let redis_info = match transport {
            Transport::Redis => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| client_err(&format!("redis URL {}", redact_url(&url)), e))?;
                Some(
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| client_err(&format!("connect {}", redact_url(&url)), e))?,
                )
            }
            _ => None,
        };
        Ok(Broker {
            transport,
            url: Some(url),
            server,
            monitor_port,
            redis_info,
            cluster: None,
            sentinel: None,
        })
    }

    /// Starts a private 3-node NATS cluster with JetStream on free loopback ports; both
    /// sides get all three seed URLs.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when nats-server is missing or the cluster does not form.
    pub(crate) async fn open_nats_cluster() -> Result<Broker> {
        let cluster = tokio::task::spawn_blocking(|| {
            busway_testkit::nats_cluster::NatsCluster::start("busway-bench")
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Connection,
                "could not start a private 3-node nats-server cluster (is nats-server installed?)",
            )
        })?;
        Ok(Broker {
            transport: Transport::Nats,
            url: Some(cluster.urls()),
            server: None,
            monitor_port: None,
            redis_info: None,
            cluster: Some(cluster),
            sentinel: None,
        })
    }

    /// Starts a private Sentinel set (primary, one replica, 3 sentinels) on free loopback
    /// ports: busway gets the `redis+sentinel://` URL, the raw client the primary's.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when redis-server is missing or the set does not form.
    pub(crate) async fn open_redis_sentinel() -> Result<Broker> {
        let set = tokio::task::spawn_blocking(|| {
            busway_testkit::redis_sentinel::SentinelSet::start("busway-bench")
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Connection,
                "could not start a private Sentinel set (is redis-server installed?)",
            )
        })?;
        let primary = set
            .primary()
            .ok_or_else(|| Error::new(ErrorKind::Connection, "the Sentinel set has no primary"))?;
        let raw = set.node_url(primary);
        let mut broker = Broker::open(Transport::Redis, Some(&raw)).await?;
        broker.url = Some(set.url());
        broker.sentinel = Some((set, raw));
        Ok(broker)
    }

    /// The URL the raw client connects to: the primary of a Sentinel set, else [`Self::url`].
    pub(crate) fn raw_url(&self) -> Option<&str> {
        match &self.sentinel {
            Some((_, raw)) => Some(raw),
            None => self.url(),
        }
    }

    /// How many servers hold each JetStream stream: 3 on a private cluster, else 1.
    pub(crate) fn replicas(&self) -> usize {
        if self.cluster.is_some() {
            3
        } else {
            1
        }
    }

    /// The broker URL (`None` for memory).
    pub(crate) fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// One line saying which broker this is, without secrets.
    pub(crate) fn describe(&self) -> String {
        if let Some(c) = &self.cluster {
            return format!("private 3-node nats cluster at {} (streams R3)", c.urls());
        }
        if let Some((set, raw)) = &self.sentinel {
            return format!(
                "private Sentinel set (primary + 1 replica + 3 sentinels): busway {}, raw {raw}",
                set.url()
            );
        }
        match (&self.url, &self.server) {
            (None, _) => "in-process (no broker)".to_string(),
            (Some(u), Some(s)) => format!(
                "private {} at {} (pid {})",
                self.transport.as_str(),
                u,
                s.pid().map_or("?".to_string(), |p| p.to_string())
            ),
            (Some(u), None) => format!("{} at {}", self.transport.as_str(), redact_url(u)),
        }
    }

    /// The broker's CPU time so far (user + system seconds), when it can be read: Redis from
    /// `INFO cpu`; nats-server from /proc when this bench started it.
    pub(crate) async fn cpu_seconds(&self) -> Option<f64> {
        match self.transport {
            Transport::Memory => None,
            Transport::Redis => {
                let mut conn = self.redis_info.clone()?;
                let info: String = redis::cmd("INFO")
                    .arg("cpu")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                parse_redis_cpu(&info)
            }
            Transport::Nats => match &self.cluster {
                Some(c) => c
                    .nodes()
                    .iter()
                    .map(|n| proc_cpu_seconds(n.pid()?))
                    .sum::<Option<f64>>(),
                None => proc_cpu_seconds(self.server.as_ref()?.pid()?),
            },
        }
    }
}

impl Broker {
    /// Client connections the broker holds now, not counting this bench's own admin
    /// connection: Redis `CLIENT LIST`; NATS `/connz` when this bench started the server.
    pub(crate) async fn client_connections(&self) -> Option<u64> {
        match self.transport {
            Transport::Memory => None,
            Transport::Redis => {
                let mut conn = self.redis_info.clone()?;
                let list: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let n = list.lines().filter(|l| !l.trim().is_empty()).count() as u64;
                Some(n.saturating_sub(1))
            }
            Transport::Nats => {
                let port = self.monitor_port?;
                let body = tokio::task::spawn_blocking(move || http_get(port, "/connz"))
                    .await
                    .ok()??;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                v["num_connections"].as_u64()
            }
        }
    }
}

/// A plain HTTP/1.0 GET on the loopback monitoring port; the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// `used_cpu_sys + used_cpu_user` from an `INFO cpu` reply.
fn parse_redis_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// utime + stime of a process from `/proc/<pid>/stat`, in seconds (clock ticks of 1/100 s, the
/// Linux USER_HZ).
pub(crate) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis start with
    // the state (field 3), so utime (14) and stime (15) are the 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_cpu_fields_not_their_longer_cousins() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.0\r\nused_cpu_sys_main_thread:7.0\r\n";
        assert_eq!(parse_redis_cpu(info), Some(3.75));
        assert_eq!(parse_redis_cpu("# CPU\r\n"), None);
    }

    #[test]
    fn reads_own_process_cpu() {
        assert!(proc_cpu_seconds(std::process::id()).is_some());
    }
}
