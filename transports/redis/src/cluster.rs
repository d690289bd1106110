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

use redis::{ConnectionInfo, IntoConnectionInfo};

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
