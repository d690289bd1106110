//! Redis Sentinel: the `redis+sentinel://` URL form and the primary lookup every connection
//! of a Sentinel-managed bus goes through.
//!
//! `redis+sentinel://[user:password@]host1[:port1],host2[:port2],.../<master-name>[?db=N]`
//! (sentinel port 26379 when left out). The credentials and `db` are the Redis nodes' (the
//! primary and its replicas); the sentinels are asked without credentials.
//!
//! Every connection the bus opens (command, pub/sub, stream readers) first asks the sentinels
//! for the current primary (`SENTINEL MASTERS` through the `redis` crate, which also checks
//! with `ROLE` that the node it names is a primary) and connects there. A failover drops the
//! connections to the old primary (killed, or demoted: sentinels `CLIENT KILL` its clients,
//! and a write it refuses with `READONLY` counts as a lost connection), so the bus's usual
//! reconnect (backoff, resubscribe, resend) lands on the new primary.

use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo};

/// The sentinel port when a host names none.
const SENTINEL_PORT: u16 = 26379;

/// The scheme of a Sentinel URL.
pub(crate) const SCHEME: &str = "redis+sentinel://";

/// A parsed `redis+sentinel://` URL.
#[derive(Clone)]
pub(crate) struct SentinelUrl {
    /// `(host, port)` of each sentinel, in the URL's order.
    pub(crate) sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under.
    pub(crate) master: String,
    /// The Redis nodes' settings: user, password, db.
    pub(crate) node: RedisConnectionInfo,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

impl SentinelUrl {
    /// Parses `url`; the error says what is wrong without quoting a password (the caller
    /// names the URL, redacted).
    pub(crate) fn parse(url: &str) -> Result<SentinelUrl, String> {
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("does not start with {SCHEME}"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, master) = rest.split_once('/').ok_or(
            "names no master: expected redis+sentinel://host:port,host:port/<master-name>",
        )?;
        if master.is_empty() || master.contains('/') {
            return Err(format!(
                "the path must be the master name alone (redis+sentinel://host:port,.../<master-name>), not {master:?}"
            ));
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',') {
            let (h, port) = match host.rsplit_once(':') {
                Some((h, p)) => {
                    let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!("sentinel {host:?}: the port must be a number from 1 to 65535")
                    })?;
                    (h, port)
                }
                None => (host, SENTINEL_PORT),
            };
            if h.is_empty() {
                return Err(format!(
                    "sentinel {host:?} has no host (hosts are comma-separated: h1:26379,h2:26379)"
                ));
            }
            sentinels.push((h.to_string(), port));
        }
        let mut db = 0i64;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("db", v)) => {
                    db = v
                        .parse()
                        .ok()
                        .filter(|d| *d >= 0)
                        .ok_or_else(|| format!("db must be a number from 0, not {v:?}"))?;
                }
                _ => {
                    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                    return Err(format!(
                        "unknown query parameter {key:?} (redis+sentinel:// takes db=N)"
                    ));
                }
            }
        }
        // The Redis crate's own URL parser decodes the user and password (percent-encoding).
        let credentials = match userinfo {
            Some(u) => format!("{u}@"),
            None => String::new(),
        };
        let node = format!("redis://{credentials}127.0.0.1:1/{db}")
            .as_str()
            .into_connection_info()
            .map_err(|_| "the user or password cannot be parsed".to_string())?
            .redis_settings()
            .clone();
        Ok(SentinelUrl {
            sentinels,
            master: master.to_string(),
            node,
        })
    }
}

/// The sentinels of one bus and how to reach its primary.
pub(crate) struct SentinelSet {
    /// One `Sentinel` per address, each asked on its own with a timeout: the crate's own
    /// lookup over several addresses waits on them in order, so one frozen sentinel would
    /// hold every reconnect.
    sentinels: Vec<(String, tokio::sync::Mutex<Sentinel>)>,
    master: String,
    node: SentinelNodeConnectionInfo,
    node_resp3: SentinelNodeConnectionInfo,
    /// The primary's `host:port` last connected to, to log a change once.
    last: parking_lot::Mutex<Option<String>>,
    /// How many times a lookup found another primary than the one before.
    moves: std::sync::atomic::AtomicU64,
}

impl SentinelSet {
    pub(crate) fn new(url: &SentinelUrl) -> redis::RedisResult<SentinelSet> {
        let sentinels = url
            .sentinels
            .iter()
            .map(|(h, p)| {
                let addr = format!("{h}:{p}");
                let sentinel = Sentinel::build(vec![format!("redis://{addr}")])?;
                Ok((addr, tokio::sync::Mutex::new(sentinel)))
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let node =
            SentinelNodeConnectionInfo::default().set_redis_connection_info(url.node.clone());
        let node_resp3 = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(url.node.clone().set_protocol(ProtocolVersion::RESP3));
        Ok(SentinelSet {
            sentinels,
            master: url.master.clone(),
            node,
            node_resp3,
            last: parking_lot::Mutex::new(None),
            moves: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A client for the current primary (`resp3`: a RESP3 one, for push connections), from
    /// the first sentinel that names one that answers `ROLE` as a primary. Each sentinel gets
    /// `timeout`. The error says what each sentinel answered.
    pub(crate) async fn primary(
        &self,
        resp3: bool,
        timeout: Duration,
        bus: &str,
    ) -> Result<Client, String> {
        let node = if resp3 { &self.node_resp3 } else { &self.node };
        let mut why = Vec::new();
        for (addr, sentinel) in &self.sentinels {
            let lookup = async {
                let mut sentinel = sentinel.lock().await;
                sentinel.async_master_for(&self.master, Some(node)).await
            };
            match tokio::time::timeout(timeout, lookup).await {
                Ok(Ok(client)) => {
                    let primary = client.get_connection_info().addr().to_string();
                    let mut last = self.last.lock();
                    if last.as_deref() != Some(primary.as_str()) {
                        if last.is_some() {
                            self.moves
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(bus, master = %self.master, %primary, "sentinel: the primary moved");
                        }
                        *last = Some(primary);
                    }
                    return Ok(client);
                }
                Ok(Err(e)) => why.push(format!("sentinel {addr}: {e}")),
                Err(_) => why.push(format!("sentinel {addr}: no answer within {timeout:?}")),
            }
        }
        Err(format!(
            "no sentinel named a reachable primary for master {:?} ({})",
            self.master,
            why.join("; ")
        ))
    }
}

impl SentinelSet {
    /// How many times a lookup found another primary than the one before.
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One data node of a Sentinel set or a cluster, as the sentinels or the cluster name it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerNode {
    /// `primary` or `replica`.
    pub role: &'static str,
    /// `host:port`.
    pub addr: String,
    /// A client for it, with the URL's credentials and db.
    pub client: Client,
}

/// The data nodes behind a `redis+sentinel://` URL: the primary first, then the replicas
/// the sentinels know (each checked with `ROLE`), for tools that must visit every node
/// (`busway audit`). Each sentinel is given `timeout`.
///
/// # Errors
/// `InvalidConfig` for a URL that is not a valid `redis+sentinel://` URL; `Connection` when
/// no sentinel names a reachable primary. Messages show the URL redacted.
pub async fn sentinel_nodes(url: &str, timeout: Duration) -> busway::Result<Vec<ServerNode>> {
    use busway::transport::{redact_url, scrub_secrets};
    let shown = redact_url(url);
    let parsed = SentinelUrl::parse(url)
        .map_err(|why| busway::Error::config(format!("{shown:?}: {}", scrub_secrets(&why, url))))?;
    let connection = |why: String| {
        busway::Error::new(
            busway::ErrorKind::Connection,
            format!("{shown}: {}", scrub_secrets(&why, url)),
        )
    };
    let set = SentinelSet::new(&parsed).map_err(|e| connection(e.to_string()))?;
    let primary = set
        .primary(false, timeout, "audit")
        .await
        .map_err(connection)?;
    let mut nodes = vec![ServerNode {
        role: "primary",
        addr: primary.get_connection_info().addr().to_string(),
        client: primary,
    }];
    for (_, sentinel) in &set.sentinels {
        let lookup = async {
            let mut sentinel = sentinel.lock().await;
            sentinel
                .async_get_replica_clients(&set.master, Some(&set.node))
                .await
        };
        if let Ok(Ok(replicas)) = tokio::time::timeout(timeout, lookup).await {
            nodes.extend(replicas.into_iter().map(|client| ServerNode {
                role: "replica",
                addr: client.get_connection_info().addr().to_string(),
                client,
            }));
            break;
        }
    }
    Ok(nodes)
}

/// Whether `url` is a Sentinel URL.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with(SCHEME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_master_credentials_and_db() {
        let u = SentinelUrl::parse("redis+sentinel://app:p%40ss@h1:26380,h2,h3:1/mymaster?db=2")
            .unwrap();
        assert_eq!(
            u.sentinels,
            [
                ("h1".to_string(), 26380),
                ("h2".to_string(), 26379),
                ("h3".to_string(), 1)
            ]
        );
        assert_eq!(u.master, "mymaster");
        assert_eq!(u.node.username(), Some("app"));
        assert_eq!(u.node.password(), Some("p@ss"));
        assert_eq!(u.node.db(), 2);
        assert!(!format!("{u:?}").contains("p@ss"));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for (url, want) in [
            ("redis+sentinel://h1:26379", "names no master"),
            ("redis+sentinel://h1:26379/", "master name alone"),
            ("redis+sentinel://h1:x/m", "port must be a number"),
            ("redis+sentinel://h1:1,,h2:2/m", "has no host"),
            ("redis+sentinel://h1/m?db=-1", "db must be"),
            (
                "redis+sentinel://h1/m?password=pw",
                "unknown query parameter \"password\"",
            ),
        ] {
            let err = SentinelUrl::parse(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }
}
