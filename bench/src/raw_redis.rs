//! The raw Redis baseline with redis-rs: `PUBLISH` on one `MultiplexedConnection` with the
//! same number of commands in flight as busway, one pub/sub connection per subscriber;
//! stream mode `XADD ... MAXLEN ~` the same way, and per subscriber its own consumer group read with
//! `XREADGROUP ... BLOCK` on a dedicated connection, each batch acked with one `XACK`.

use std::time::Duration;

use busway::transport::redact_url;
use busway::{Error, ErrorKind, Mode, Result};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::AsyncConnectionConfig;

use super::broker::Broker;
use super::engine::{client_err, publish_all, publish_loop, Run, SideResult};
use super::Plan;

/// Entries read per `XREADGROUP` (busway-redis's default `read_count`).
const READ_COUNT: usize = 256;
/// `XADD MAXLEN ~` (busway-redis's default `stream_maxlen`).
const STREAM_MAXLEN: u64 = 100_000;

/// Runs one shape with redis-rs.
///
/// # Errors
/// The broker cannot be reached, or a command failed.
pub(crate) async fn run(plan: &Plan, broker: &Broker) -> Result<SideResult> {
    let url = broker
        .raw_url()
        .ok_or_else(|| Error::new(ErrorKind::Connection, "no Redis URL"))?;
    let client = redis::Client::open(url)
        .map_err(|e| client_err(&format!("redis URL {}", redact_url(url)), e))?;
    match plan.mode {
        Mode::Broadcast => pubsub(plan, broker, &client).await,
        Mode::Stream => streams(plan, broker, &client).await,
    }
}

/// A multiplexed connection whose replies may take as long as a loaded machine needs
/// (`timeout` `None`: for blocking reads).
async fn connect(
    client: &redis::Client,
    timeout: Option<Duration>,
) -> Result<MultiplexedConnection> {
    client
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new().set_response_timeout(timeout),
        )
        .await
        .map_err(|e| client_err("connect to Redis", e))
}

/// Publishes with `cmd_for(payload)` on clones of one multiplexed connection, `inflight` at
/// a time per publisher.
async fn publish_with(
    plan: &Plan,
    run: &mut Run,
    conn: &MultiplexedConnection,
    cmd_for: impl Fn(&[u8]) -> redis::Cmd + Clone + Send + Sync + 'static,
) -> Result<u64> {
    publish_all(run, |share, deadline| {
        let conn = conn.clone();
        let plan = plan.clone();
        let cmd_for = cmd_for.clone();
        async move {
            publish_loop(&plan, share, deadline, |payload| {
                let cmd = cmd_for(&payload);
                let mut conn = conn.clone();
                async move {
                    cmd.query_async::<redis::Value>(&mut conn)
                        .await
                        .map(drop)
                        .map_err(|e| client_err("raw publish", e))
                }
            })
            .await
        }
    })
    .await
}

async fn pubsub(plan: &Plan, broker: &Broker, client: &redis::Client) -> Result<SideResult> {
    let channel = plan.topic("raw");
    let mut run = Run::new(plan);
    let mut readers = Vec::new();
    for i in 0..plan.subscribers {
        let mut ps = client
            .get_async_pubsub()
            .await
            .map_err(|e| client_err("open a pub/sub connection", e))?;
        ps.subscribe(&channel)
            .await
            .map_err(|e| client_err("SUBSCRIBE", e))?;
        let mut messages = ps.into_on_message();
        let tally = run.tally(i);
        readers.push(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                tally.record(m.get_payload_bytes());
            }
        }));
    }
    let conn = connect(client, Some(Duration::from_secs(30))).await?;
    let cpu_before = broker.cpu_seconds().await;
    let published = publish_with(plan, &mut run, &conn, move |payload| {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&channel).arg(payload);
        cmd
    })
    .await?;
    let what = format!(
        "redis-rs PUBLISH on one MultiplexedConnection, {} in flight per publisher; {} pub/sub connection(s), one per subscriber",
        plan.inflight, plan.subscribers
    );
    let result = run
        .finish_with_cpu(what, published, broker, cpu_before, readers)
        .await;
    Ok(result)
}

async fn streams(plan: &Plan, broker: &Broker, client: &redis::Client) -> Result<SideResult> {
    let key = plan.topic("raw");
    let mut run = Run::new(plan);
    let mut conn = connect(client, Some(Duration::from_secs(30))).await?;
    let mut readers = Vec::new();
    for i in 0..plan.subscribers {
        let group = format!("g{i}");
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(&group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| client_err("XGROUP CREATE", e))?;
        // Its own connection: a blocked XREADGROUP holds the connection's reply order.
        let mut reader = connect(client, None).await?;
        let tally = run.tally(i);
        let key = key.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let reply: StreamReadReply = match redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&group)
                    .arg("c")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut reader)
                    .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        tally.error();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
                if entries.is_empty() {
                    continue;
                }
                let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                if redis::cmd("XACK")
                    .arg(&key)
                    .arg(&group)
                    .arg(&ids)
                    .query_async::<i64>(&mut reader)
                    .await
                    .is_err()
                {
                    tally.error();
                }
                for e in &entries {
                    match e.map.get("payload") {
                        Some(redis::Value::BulkString(b)) => tally.record(b),
                        _ => tally.error(),
                    }
                }
            }
        }));
    }
    let cpu_before = broker.cpu_seconds().await;
    let xadd_key = key.clone();
    let published = publish_with(plan, &mut run, &conn, move |payload| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&xadd_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAXLEN)
            .arg("*")
            .arg("payload")
            .arg(payload);
        cmd
    })
    .await?;
    let what = format!(
        "redis-rs XADD MAXLEN ~ {STREAM_MAXLEN} on one MultiplexedConnection, {} in flight per publisher; per subscriber a consumer group read by XREADGROUP COUNT {READ_COUNT} BLOCK 1000 on its own connection, one XACK per batch",
        plan.inflight
    );
    let result = run
        .finish_with_cpu(what, published, broker, cpu_before, readers)
        .await;
    let _ = redis::cmd("DEL")
        .arg(&key)
        .query_async::<i64>(&mut conn)
        .await;
    Ok(result)
}
