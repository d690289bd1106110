//! What a Redis bus exports through `busway::metrics`, on a real redis-server: its
//! transport kind, and the consumer lag of a group (`XINFO GROUPS`).

mod common;

use std::sync::{Arc, OnceLock};

use busway::{Bus, Mode};
use busway_testkit::metrics;
use busway_testkit::redis::RedisServer;

use common::connect;

/// The process's Prometheus exposition (one recorder per test process).
fn render() -> String {
    static RENDER: OnceLock<Box<dyn Fn() -> String + Send + Sync>> = OnceLock::new();
    RENDER.get_or_init(|| {
        let handle = busway::metrics::install().expect("the only recorder");
        Box::new(move || handle.render())
    })()
}

#[tokio::test]
async fn a_bus_built_in_code_is_labelled_redis() {
    let Some(server) = RedisServer::start("metrics_kind") else {
        return;
    };
    let bus: Arc<dyn Bus> =
        Arc::new(connect("orders", &server.url(), Mode::Broadcast, |_| {}).await);
    metrics::transport_kind_in_labels(bus, "redis", "kind.one", &render).await;
}

#[tokio::test]
async fn consumer_lag_per_group_from_xinfo_groups() {
    let Some(server) = RedisServer::start("metrics_lag") else {
        return;
    };
    let bus: Arc<dyn Bus> = Arc::new(connect("orders", &server.url(), Mode::Stream, |_| {}).await);
    metrics::consumer_lag_follows_a_group(bus, "redis", "orders.lag", &render).await;
}
