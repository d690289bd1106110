//! What a NATS bus exports through `busway::metrics`, on a real nats-server: its transport
//! kind, and the consumer lag of a group (JetStream consumer info).

mod common;

use std::sync::{Arc, OnceLock};

use busway::{Bus, Mode};
use busway_testkit::metrics;
use busway_testkit::nats::NatsServer;

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
async fn a_bus_built_in_code_is_labelled_nats() {
    let Some(server) = NatsServer::start("metrics_kind") else {
        return;
    };
    let bus: Arc<dyn Bus> = Arc::new(
        connect(&server.url(), "orders", Mode::Broadcast, "")
            .await
            .unwrap(),
    );
    metrics::transport_kind_in_labels(bus, "nats", "kind.one", &render).await;
}

#[tokio::test]
async fn consumer_lag_per_group_from_consumer_info() {
    let Some(server) = NatsServer::start("metrics_lag") else {
        return;
    };
    let bus: Arc<dyn Bus> = Arc::new(
        connect(
            &server.url(),
            "orders",
            Mode::Stream,
            "subjects = [\"orders.>\"]",
        )
        .await
        .unwrap(),
    );
    metrics::consumer_lag_follows_a_group(bus, "nats", "orders.lag", &render).await;
}
