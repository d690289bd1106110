//! Redis Cluster: the `redis+cluster://` URL form.
//!
//! `redis+cluster://[user:password@]host1:port1,host2:port2,...`: any reachable node lets the
//! `redis` crate's cluster client learn the rest (`CLUSTER SLOTS`); listing several covers a
//! dead one at start-up. A cluster has database 0 only, so there is no `/db`.
//!
//! What a cluster bus does differently (the rest is the one-server behaviour):
//! - broadcast mode publishes with `SPUBLISH` and subscribes with `SSUBSCRIBE` (sharded
//!   pub/sub, Redis 7): a message travels only within the shard that owns its channel's slot,
//!   so channels spread over the shards. Patterns cannot be sharded: a wildcard subscription
//!   is refused with `Unsupported` naming the bus (`capabilities().wildcards` is false);
//! - stream mode is refused at config time (a reader's one blocking `XREADGROUP` over all of
//!   its keys would cross slots).

use std::time::Duration;

use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::sentinel::ServerNode;

/// The scheme of a cluster URL.
pub(crate) const SCHEME: &str = "redis+cluster://";

/// Whether `url` is a cluster URL.
pub(crate) fn is_cluster_url(url: &str) -> bool {
    url.starts_with(SCHEME)
}

/// The nodes of a `redis+cluster://` URL, each with the URL's credentials; the error says
/// what is wrong without quoting a password.
pub(crate) fn node_infos(url: &str) -> Result<Vec<ConnectionInfo>, String> {
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| format!("does not start with {SCHEME}"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('?') || rest.contains('/') {
        return Err(
            "takes no path or query (a cluster has database 0 only): redis+cluster://host:port,host:port"
                .to_string(),
        );
    }
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let credentials = userinfo.map_or(String::new(), |u| format!("{u}@"));
    hosts
        .split(',')
        .map(|host| {
            let (h, p) = host.rsplit_once(':').ok_or_else(|| {
                format!("node {host:?} has no port (redis+cluster://host:port,host:port)")
            })?;
            if h.is_empty() || p.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
                return Err(format!(
                    "node {host:?}: expected host:port with a port from 1 to 65535"
                ));
            }
            format!("redis://{credentials}{host}")
                .as_str()
                .into_connection_info()
                .map_err(|_| format!("node {host:?}: the user or password cannot be parsed"))
        })
        .collect()
}

/// The nodes of the cluster a `redis+cluster://` URL names, primaries and replicas, from
/// `CLUSTER NODES` of the first listed node that answers within `timeout` (failed nodes and
/// nodes still joining left out), for tools that must visit every node (`busway audit`).
///
/// # Errors
/// `InvalidConfig` for a URL that is not a valid `redis+cluster://` URL; `Connection` when
/// no listed node answers. Messages show the URL redacted.
pub async fn cluster_nodes(url: &str, timeout: Duration) -> busway::Result<Vec<ServerNode>> {
    use busway::transport::{redact_url, scrub_secrets};
    let shown = redact_url(url);
    let infos = node_infos(url)
        .map_err(|why| busway::Error::config(format!("{shown:?}: {}", scrub_secrets(&why, url))))?;
    let mut why = Vec::new();
    for info in &infos {
        let ask = async {
            let mut con = Client::open(info.clone())?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut con)
                .await
        };
        let text = match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => {
                why.push(format!("{}: {e}", info.addr()));
                continue;
            }
            Err(_) => {
                why.push(format!("{}: no answer within {timeout:?}", info.addr()));
                continue;
            }
        };
        let mut nodes = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
                continue;
            };
            if ["fail", "handshake", "noaddr"]
                .iter()
                .any(|x| flags.contains(x))
            {
                continue;
            }
            let hostport = addr.split('@').next().unwrap_or(addr);
            let Some((host, port)) = hostport.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let node = info
                .clone()
                .set_addr(ConnectionAddr::Tcp(host.to_string(), port));
            let client = Client::open(node).map_err(|e| {
                busway::Error::new(
                    busway::ErrorKind::Connection,
                    format!("{shown}: {}", scrub_secrets(&e.to_string(), url)),
                )
            })?;
            nodes.push(ServerNode {
                role: if flags.contains("master") {
                    "primary"
                } else {
                    "replica"
                },
                addr: hostport.to_string(),
                client,
            });
        }
        // Primaries first, then by address, whatever order the node listed them in.
        nodes.sort_by(|a, b| (a.role != "primary", &a.addr).cmp(&(b.role != "primary", &b.addr)));
        return Ok(nodes);
    }
    Err(busway::Error::new(
        busway::ErrorKind::Connection,
        format!(
            "{shown}: no cluster node answered ({})",
            scrub_secrets(&why.join("; "), url)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nodes_and_credentials() {
        let nodes = node_infos("redis+cluster://app:p%40ss@h1:7000,h2:7001/").unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr().to_string(), "h2:7001");
        assert_eq!(nodes[0].redis_settings().password(), Some("p@ss"));
        for (url, want) in [
            ("redis+cluster://h1", "has no port"),
            ("redis+cluster://h1:x,h2:1", "expected host:port"),
            ("redis+cluster://h1:1/0", "takes no path or query"),
            (
                "redis+cluster://u:pw@h1:1?password=pw",
                "takes no path or query",
            ),
        ] {
            let err = node_infos(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
    }
}
