//! Consumer lag per group ([`consumer_lag`]): `XINFO GROUPS` on every stream key of the bus
//! (under a layout, the keys of its key templates without a `{field}`), summed per group. Read at scrape time, never on the message path.

use std::collections::BTreeMap;

use redis::Value;

use busway::{GroupLag, Result};

use crate::state::Shared;

/// Keys asked at once: the commands pipeline on the command connection, and a bus with many
/// topics does not queue them all in front of the publishes.
const KEYS_AT_ONCE: usize = 256;

/// Every consumer group on the bus's stream keys (the topics in `index_key`): `lag` (entries
/// not yet delivered to the group, Redis 7+) and `pending` (delivered, not acked), summed
/// over the keys the group reads. A group's lag is `None` when Redis cannot tell it for one
/// of its keys (entries deleted from the middle, or a server before 7). A key gone since it
/// was indexed is skipped.
///
/// # Errors
/// `Connection` while the command connection is down; the `SMEMBERS` failing.
pub(crate) async fn consumer_lag(shared: &Shared) -> Result<Vec<GroupLag>> {
    let mut cmd = shared.cmd_connection()?;
    let config = &shared.config;
    let keys: Vec<String> = match &shared.layout {
        Some(layout) => layout.literal_keys(),
        None => {
            let topics: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&config.index_key)
                .query_async(&mut cmd)
                .await
                .map_err(|e| shared.connector.error("SMEMBERS", e))?;
            topics
                .iter()
                .map(|t| format!("{}{t}", config.key_prefix))
                .collect()
        }
    };
    let mut groups: BTreeMap<String, (Option<u64>, u64)> = BTreeMap::new();
    for chunk in keys.chunks(KEYS_AT_ONCE) {
        let answers = futures::future::join_all(chunk.iter().map(|key| {
            let mut cmd = cmd.clone();
            async move {
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(key)
                    .query_async::<Value>(&mut cmd)
                    .await
            }
        }))
        .await;
        // An error is a key deleted (or of another type) since it was indexed: it holds no
        // group of this bus.
        for answer in answers.into_iter().flatten() {
            for group in items(&answer) {
                let Some((name, lag, pending)) = group_fields(group) else {
                    continue;
                };
                let sum = groups.entry(name).or_insert((Some(0), 0));
                sum.0 = sum.0.zip(lag).map(|(a, b)| a.saturating_add(b));
                sum.1 = sum.1.saturating_add(pending);
            }
        }
    }
    Ok(groups
        .into_iter()
        .map(|(name, (lag, pending))| GroupLag::new(name, lag, pending))
        .collect())
}

/// The elements of an array reply (RESP2 or RESP3).
fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// One group of an `XINFO GROUPS` reply: its name, lag (`None`: nil or absent) and pending
/// count. RESP2 sends it as a flat array of field, value; RESP3 as a map.
fn group_fields(group: &Value) -> Option<(String, Option<u64>, u64)> {
    let pairs: Vec<(&Value, &Value)> = match group {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(flat) => flat.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
        _ => return None,
    };
    let (mut name, mut lag, mut pending) = (None, None, 0);
    for (k, v) in pairs {
        match (text(k).as_deref(), v) {
            (Some("name"), v) => name = text(v),
            (Some("lag"), Value::Int(n)) => lag = u64::try_from(*n).ok(),
            (Some("pending"), Value::Int(n)) => pending = u64::try_from(*n).unwrap_or(0),
            _ => {}
        }
    }
    Some((name?, lag, pending))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}
