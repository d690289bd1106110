//! Checks of what a bus exports through `busway::metrics`, run by each transport's tests on
//! a real broker: the `transport` label of a bus built in code.
//!
//! The caller installs the recorder (one per test process) and passes its rendering: the
//! Prometheus text exposition.

use std::sync::Arc;

use busway::{Bus, Message, Router, Topic};

/// The value of series `name` whose labels include every `(label, value)` of `labels`, in a
/// Prometheus text exposition.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.rsplit_once("} "))
        .find(|(ls, _)| {
            labels
                .iter()
                .all(|(k, v)| ls.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// A router built in code over `bus` (named `orders`, routing `topic`), so its series carry
/// `app="busway"` and the transport the bus itself reports.
fn router(bus: &Arc<dyn Bus>, topic: &str) -> Router {
    Router::builder()
        .bus("orders", bus.clone())
        .route(topic, &["orders"])
        .build()
        .expect("router over one bus")
}

/// Asserts that `bus` reports `kind` and that a router built in code over it exports its
/// series with `transport = kind`.
pub async fn transport_kind_in_labels(
    bus: Arc<dyn Bus>,
    kind: &str,
    topic: &str,
    render: &dyn Fn() -> String,
) {
    // Rendering once installs the caller's recorder, before anything records.
    render();
    assert_eq!(bus.transport_kind(), kind);
    let router = router(&bus, topic);
    router
        .publish(Message::new(Topic::new(topic).expect("topic"), "one"))
        .await
        .expect("publish");
    busway::metrics::collect();
    let text = render();
    let labels = [("app", "busway"), ("bus", "orders"), ("transport", kind)];
    assert!(
        value(&text, busway::metrics::PUBLISHED, &labels).is_some_and(|n| n >= 1.0),
        "no {} with {labels:?} in\n{text}",
        busway::metrics::PUBLISHED
    );
    router.close().await.expect("close");
}
