//! `busway audit URL`: who is connected to a broker, per busway app and bus (from the client
//! names busway sets, `busway:<app>:<bus>`) and per other client name, plus the server's CPU
//! use. The question a migration is tracked by: which engines still hold connections to the
//! main Redis.
//!
//! - `redis://` (or `rediss://`): `CLIENT LIST`, and `INFO cpu` sampled twice `interval`
//!   apart (`used_cpu_sys + used_cpu_user` over wall time, as % of one core). The audit's own
//!   connection is left out.
//! - NATS: the monitoring endpoint (`http://host:8222`, or `--monitor` beside a `nats://`
//!   URL): `/connz` (each connection's `name`), paged, and `/varz`'s `cpu` (the server's own
//!   reading, % of one core). A plain HTTP/1.0 GET over a tokio `TcpStream`: no HTTP client
//!   dependency for three GETs.
//! - A Sentinel set (`redis+sentinel://s1,s2,s3/<master>`) or a Redis Cluster
//!   (`redis+cluster://n1,n2,...`): the sentinels name the primary and its replicas (a
//!   cluster: `CLUSTER NODES` of the first node that answers), each is read as a `redis://`
//!   server, and the rows are summed over the nodes as for a NATS cluster (below). The
//!   sentinels' own client lists are not read: busway's lookups hold one unnamed connection
//!   per sentinel and bus there.
//! - A NATS cluster: the monitoring URLs of its nodes, comma-separated
//!   (`http://n1:8222,http://n2:8222,http://n3:8222`): each node is read as above (its
//!   `/varz` `server_name` names it), every busway row sums the app's connections to the bus
//!   over the nodes and says how many are on which node, and each node gets a row of its own
//!   (connections, CPU). A connection is on exactly one node, so nothing is counted twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use busway::transport::redact_url;
use busway::{Error, ErrorKind, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::text::table;

/// The name shown for clients that did not set one.
pub const UNNAMED: &str = "(unnamed)";

/// Connections of one busway app to one bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuswayGroup {
    /// The app (`[app] name`).
    pub app: String,
    /// The bus name.
    pub bus: String,
    /// Open connections (summed over a cluster's nodes).
    pub connections: u64,
    /// A cluster: node (server name) -> connections on it. Empty for one server.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, u64>,
}

/// One node of an audited NATS cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeReport {
    /// The node's `server_name` (or its monitoring address when it has none).
    pub name: String,
    /// Its monitoring URL.
    pub monitor: String,
    /// Client connections on it.
    pub connections: u64,
    /// Its CPU use in % of one core, when it told.
    pub cpu_percent: Option<f64>,
}

/// Connections with one other client name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtherGroup {
    /// The client name, or [`UNNAMED`].
    pub name: String,
    /// Open connections.
    pub connections: u64,
}

/// What `busway audit` found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// The server audited (password redacted).
    pub server: String,
    /// `redis` or `nats`.
    pub kind: &'static str,
    /// Every client connection counted (the audit's own excluded).
    pub total_connections: u64,
    /// Connections per busway app: bus -> count.
    pub apps: BTreeMap<String, BTreeMap<String, u64>>,
    /// Busway connections, one row per app and bus.
    pub busway: Vec<BuswayGroup>,
    /// Other clients, per name.
    pub other: Vec<OtherGroup>,
    /// Server CPU use in % of one core, when the server told.
    pub cpu_percent: Option<f64>,
    /// How the CPU figure was obtained.
    pub cpu_source: String,
    /// A NATS cluster (several monitoring URLs): one row per node. Empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeReport>,
}

/// Options of `busway audit`.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// How long to sample the server's CPU counters (Redis).
    pub interval: Duration,
    /// The NATS monitoring URL (`http://host:port`), when `url` is a `nats://` URL.
    pub monitor: Option<String>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            interval: Duration::from_millis(500),
            monitor: None,
        }
    }
}

/// Audits the broker at `url`.
///
/// # Errors
/// [`ErrorKind::InvalidConfig`] for a URL that is neither Redis nor NATS monitoring (or a
/// `nats://` URL without `--monitor`); [`ErrorKind::Connection`] when the server cannot be
/// reached or answers something unexpected. URLs in errors are redacted.
pub async fn audit(url: &str, options: &AuditOptions) -> Result<AuditReport> {
    if url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis+unix://")
    {
        return audit_redis(url, options.interval).await;
    }
    if url.starts_with("redis+sentinel://") {
        let nodes = busway_redis::sentinel_nodes(url, Duration::from_secs(5)).await?;
        return audit_redis_nodes(url, nodes, options.interval).await;
    }
    if url.starts_with("redis+cluster://") {
        let nodes = busway_redis::cluster_nodes(url, Duration::from_secs(5)).await?;
        return audit_redis_nodes(url, nodes, options.interval).await;
    }
    if url.starts_with("http://") {
        return audit_nats(url).await;
    }
    if url.starts_with("nats://") {
        return match &options.monitor {
            Some(m) => audit_nats(m).await,
            None => Err(Error::config(format!(
                "{}: auditing NATS needs its monitoring endpoint: pass --monitor http://HOST:8222 (nats-server -m 8222), or that URL instead",
                redact_url(url)
            ))),
        };
    }
    Err(Error::config(format!(
        "{}: expected a redis://, redis+sentinel:// or redis+cluster:// URL or a NATS monitoring URL (http://HOST:8222)",
        redact_url(url)
    )))
}

/// Splits a client name into (app, bus) when it is a busway name.
fn busway_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("busway:")?;
    let (app, bus) = rest.split_once(':')?;
    (!app.is_empty() && !bus.is_empty()).then_some((app, bus))
}

/// Groups client names (one per connection; empty = unnamed) into a report.
fn group(server: String, kind: &'static str, names: &[String]) -> AuditReport {
    let mut apps: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut other: BTreeMap<String, u64> = BTreeMap::new();
    for name in names {
        match busway_name(name) {
            Some((app, bus)) => {
                *apps
                    .entry(app.to_string())
                    .or_default()
                    .entry(bus.to_string())
                    .or_default() += 1
            }
            None if name.is_empty() => *other.entry(UNNAMED.to_string()).or_default() += 1,
            None => *other.entry(name.clone()).or_default() += 1,
        }
    }
    let busway = apps
        .iter()
        .flat_map(|(app, buses)| {
            buses.iter().map(|(bus, n)| BuswayGroup {
                app: app.clone(),
                bus: bus.clone(),
                connections: *n,
                nodes: BTreeMap::new(),
            })
        })
        .collect();
    AuditReport {
        server,
        kind,
        total_connections: names.len() as u64,
        apps,
        busway,
        other: other
            .into_iter()
            .map(|(name, connections)| OtherGroup { name, connections })
            .collect(),
        cpu_percent: None,
        cpu_source: String::new(),
        nodes: Vec::new(),
    }
}

fn connection_error(server: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!("{server}: {what}: {}", redact_url(&e.to_string())),
    )
}

async fn audit_redis(url: &str, interval: Duration) -> Result<AuditReport> {
    let server = redact_url(url);
    let client = redis::Client::open(url)
        .map_err(|e| Error::config(format!("{server}: not a valid Redis URL: {e}")))?;
    audit_redis_node(server, &client, interval)
        .await
        .map(|(report, _)| report)
}

/// Audits every data node of a Sentinel set or a cluster (`nodes`, as the sentinels or the
/// cluster name them), one report summed over them with a row per node.
async fn audit_redis_nodes(
    url: &str,
    nodes: Vec<busway_redis::ServerNode>,
    interval: Duration,
) -> Result<AuditReport> {
    let mut parts = Vec::new();
    for node in nodes {
        let name = format!("{} {}", node.role, node.addr);
        let server = format!("redis://{}", node.addr);
        let (report, names) = audit_redis_node(server, &node.client, interval).await?;
        parts.push((name, report, names));
    }
    Ok(merge_nodes(
        redact_url(url),
        "redis",
        parts,
        format!(
            "INFO cpu used_cpu_sys+used_cpu_user over {} ms",
            interval.as_millis()
        ),
    ))
}

/// One Redis server's report and the client name of each connection (the audit's own
/// left out).
async fn audit_redis_node(
    server: String,
    client: &redis::Client,
    interval: Duration,
) -> Result<(AuditReport, Vec<String>)> {
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| connection_error(&server, "connect", "timed out after 5 s"))?
    .map_err(|e| connection_error(&server, "connect", e))?;
    let cpu = |info: &str| -> Option<f64> {
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(field("used_cpu_sys")? + field("used_cpu_user")?)
    };
    let info = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("INFO")
                .arg("cpu")
                .query_async::<String>(&mut conn)
                .await
        }
    };
    let first = info(&mut conn)
        .await
        .map_err(|e| connection_error(&server, "INFO cpu", e))?;
    let started = Instant::now();
    tokio::time::sleep(interval).await;
    let second = info(&mut conn)
        .await
        .map_err(|e| connection_error(&server, "INFO cpu", e))?;
    let wall = started.elapsed().as_secs_f64();
    let own: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .map_err(|e| connection_error(&server, "CLIENT ID", e))?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .map_err(|e| connection_error(&server, "CLIENT LIST", e))?;
    let names: Vec<String> = list
        .lines()
        .filter_map(|line| {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            if field("id").and_then(|id| id.parse::<i64>().ok()) == Some(own) {
                return None;
            }
            Some(field("name").unwrap_or("").to_string())
        })
        .collect();
    let mut report = group(server, "redis", &names);
    if let (Some(a), Some(b)) = (cpu(&first), cpu(&second)) {
        if wall > 0.0 {
            report.cpu_percent = Some(((b - a) / wall * 100.0).max(0.0));
        }
    }
    report.cpu_source = format!(
        "INFO cpu used_cpu_sys+used_cpu_user over {} ms",
        interval.as_millis()
    );
    Ok((report, names))
}

/// One report for several nodes, each given as (its name, its own report, its client
/// names): connections summed, each busway row saying how many are on which node, a row per
/// node, CPU summed over the nodes that told.
fn merge_nodes(
    server: String,
    kind: &'static str,
    parts: Vec<(String, AuditReport, Vec<String>)>,
    cpu_source: String,
) -> AuditReport {
    let mut names = Vec::new();
    let mut nodes = Vec::new();
    let mut per_node = Vec::new();
    for (name, report, node_names) in parts {
        nodes.push(NodeReport {
            name: name.clone(),
            monitor: report.server.clone(),
            connections: report.total_connections,
            cpu_percent: report.cpu_percent,
        });
        per_node.push((name, report.busway));
        names.extend(node_names);
    }
    let mut report = group(server, kind, &names);
    for row in &mut report.busway {
        for (node, rows) in &per_node {
            if let Some(r) = rows.iter().find(|r| r.app == row.app && r.bus == row.bus) {
                *row.nodes.entry(node.clone()).or_default() += r.connections;
            }
        }
    }
    let cpus: Vec<f64> = nodes.iter().filter_map(|n| n.cpu_percent).collect();
    report.cpu_percent = (!cpus.is_empty()).then(|| cpus.iter().sum());
    report.cpu_source = format!(
        "{cpu_source}, summed over {} of {} nodes",
        cpus.len(),
        nodes.len()
    );
    report.nodes = nodes;
    report
}

/// `host:port` and the path prefix of an `http://` URL.
fn http_target(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::config(format!("{}: expected http://HOST:PORT", redact_url(url))))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(Error::config(format!(
            "{}: credentials in the monitoring URL are not supported",
            redact_url(url)
        )));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// A plain HTTP/1.0 GET; the body of a 200 answer.
async fn http_get(authority: &str, path: &str) -> Result<String> {
    let what = format!("http://{authority}{path}");
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| connection_error(&what, "connect", e))?;
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| connection_error(&what, "send", e))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| connection_error(&what, "read", e))?;
        Ok::<_, Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| connection_error(&what, "GET", "no answer within 10 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| connection_error(&what, "GET", "not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split(' ').nth(1) != Some("200") {
        return Err(connection_error(
            &what,
            "GET",
            format!("answered {status:?}"),
        ));
    }
    Ok(body.to_string())
}

#[derive(serde::Deserialize)]
struct Connz {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    connections: Vec<Conn>,
}

#[derive(serde::Deserialize)]
struct Conn {
    #[serde(default)]
    name: String,
}

#[derive(serde::Deserialize)]
struct Varz {
    cpu: Option<f64>,
    #[serde(default)]
    server_name: String,
}

/// Audits one NATS server, or a cluster when `monitor` lists several monitoring URLs
/// (comma-separated): the nodes' reports summed, with a per-node breakdown.
async fn audit_nats(monitor: &str) -> Result<AuditReport> {
    let urls: Vec<&str> = monitor
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.len() <= 1 {
        return audit_nats_node(urls.first().copied().unwrap_or(monitor))
            .await
            .map(|(report, _)| report);
    }
    let mut parts = Vec::new();
    for url in &urls {
        let (report, node_names) = audit_nats_node(url).await?;
        let name = report
            .nodes
            .first()
            .map_or_else(|| report.server.clone(), |n| n.name.clone());
        parts.push((name, report, node_names));
    }
    let servers: Vec<String> = parts.iter().map(|(_, r, _)| r.server.clone()).collect();
    Ok(merge_nodes(
        servers.join(","),
        "nats",
        parts,
        "/varz cpu".to_string(),
    ))
}

/// One NATS server's report (its `server_name` as the only entry of `nodes`) and the
/// client name of each connection.
async fn audit_nats_node(monitor: &str) -> Result<(AuditReport, Vec<String>)> {
    let (authority, prefix) = http_target(monitor)?;
    let server = format!("http://{authority}{prefix}");
    let mut names = Vec::new();
    // /connz answers at most `limit` connections per page.
    const PAGE: usize = 1024;
    loop {
        let body = http_get(
            &authority,
            &format!("{prefix}/connz?limit={PAGE}&offset={}", names.len()),
        )
        .await?;
        let page: Connz = serde_json::from_str(&body)
            .map_err(|e| connection_error(&server, "/connz is not the expected JSON", e))?;
        let got = page.connections.len();
        names.extend(page.connections.into_iter().map(|c| c.name));
        if got < PAGE || names.len() as u64 >= page.total {
            break;
        }
    }
    let varz: Varz = serde_json::from_str(&http_get(&authority, &format!("{prefix}/varz")).await?)
        .map_err(|e| connection_error(&server, "/varz is not the expected JSON", e))?;
    let mut report = group(server.clone(), "nats", &names);
    report.cpu_percent = varz.cpu;
    report.cpu_source = "/varz cpu (the server's own reading)".to_string();
    if !varz.server_name.is_empty() {
        report.nodes.push(NodeReport {
            name: varz.server_name,
            monitor: server,
            connections: report.total_connections,
            cpu_percent: varz.cpu,
        });
    }
    Ok((report, names))
}

impl AuditReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// The report as text: totals, busway connections per app and bus, other clients.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} ({}): {} client connections, cpu {}\n",
            self.server,
            self.kind,
            self.total_connections,
            match self.cpu_percent {
                Some(p) => format!("{p:.1}% of one core ({})", self.cpu_source),
                None => "unknown".to_string(),
            }
        );
        let cluster = self.nodes.len() > 1;
        if cluster {
            out.push_str("\nnodes\n");
            let rows: Vec<Vec<String>> = self
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.monitor.clone(),
                        n.connections.to_string(),
                        n.cpu_percent.map_or("-".into(), |p| format!("{p:.1}%")),
                    ]
                })
                .collect();
            out.push_str(&table(&["node", "monitor", "connections", "cpu"], &rows));
        }
        out.push_str("\nbusway apps\n");
        if self.busway.is_empty() {
            out.push_str("  none\n");
        } else if cluster {
            let rows: Vec<Vec<String>> = self
                .busway
                .iter()
                .map(|g| {
                    let on: Vec<String> = g.nodes.iter().map(|(n, c)| format!("{n}={c}")).collect();
                    vec![
                        g.app.clone(),
                        g.bus.clone(),
                        g.connections.to_string(),
                        on.join(" "),
                    ]
                })
                .collect();
            out.push_str(&table(&["app", "bus", "connections", "on nodes"], &rows));
        } else {
            let rows: Vec<Vec<String>> = self
                .busway
                .iter()
                .map(|g| vec![g.app.clone(), g.bus.clone(), g.connections.to_string()])
                .collect();
            out.push_str(&table(&["app", "bus", "connections"], &rows));
        }
        out.push_str("\nother clients\n");
        if self.other.is_empty() {
            out.push_str("  none\n");
        } else {
            let rows: Vec<Vec<String>> = self
                .other
                .iter()
                .map(|g| vec![g.name.clone(), g.connections.to_string()])
                .collect();
            out.push_str(&table(&["name", "connections"], &rows));
        }
        let _ = writeln!(
            out,
            "\napps still connected: {}",
            if self.apps.is_empty() {
                "none".to_string()
            } else {
                self.apps.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_busway_names_by_app_and_bus_and_the_rest_by_name() {
        let names: Vec<String> = [
            "busway:portfolio:main",
            "busway:portfolio:main",
            "busway:portfolio:engine",
            "busway:ml:main",
            "legacy-engine",
            "",
            "busway:broken",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = group("redis://h:1".into(), "redis", &names);
        assert_eq!(r.total_connections, 7);
        assert_eq!(r.apps["portfolio"]["main"], 2);
        assert_eq!(r.apps["portfolio"]["engine"], 1);
        assert_eq!(r.apps["ml"]["main"], 1);
        let other: Vec<(&str, u64)> = r.other.iter().map(|o| (&*o.name, o.connections)).collect();
        assert_eq!(
            other,
            [(UNNAMED, 1), ("busway:broken", 1), ("legacy-engine", 1)]
        );
        let text = r.to_text();
        assert!(
            text.contains("apps still connected: ml, portfolio"),
            "{text}"
        );
    }

    #[test]
    fn http_targets_and_bad_urls() {
        assert_eq!(
            http_target("http://127.0.0.1:8222/").unwrap(),
            ("127.0.0.1:8222".to_string(), String::new())
        );
        assert_eq!(
            http_target("http://mon/nats").unwrap(),
            ("mon:80".to_string(), "/nats".to_string())
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(audit("nats://u:secret@h:4222", &AuditOptions::default()))
            .unwrap_err();
        assert!(err.to_string().contains("--monitor"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = rt
            .block_on(audit("ftp://h", &AuditOptions::default()))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }
}
