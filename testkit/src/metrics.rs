//! Checks of what a bus exports through `busway::metrics`, run by each transport's tests on
//! a real broker: the `transport` label of a bus built in code, and the consumer lag series.
//!
//! The caller installs the recorder (one per test process) and passes its rendering: the
//! Prometheus text exposition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use busway::{Bus, Message, Pattern, Router, SubscribeOptions, Topic};

/// How long a check waits for a value to show.
const WAIT: Duration = Duration::from_secs(15);

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
    busway::metrics::scrape().await;
    let text = render();
    let labels = [("app", "busway"), ("bus", "orders"), ("transport", kind)];
    assert!(
        value(&text, busway::metrics::PUBLISHED, &labels).is_some_and(|n| n >= 1.0),
        "no {} with {labels:?} in\n{text}",
        busway::metrics::PUBLISHED
    );
    router.close().await.expect("close");
}

/// Scrapes until the `audit` group's lag and pending read `want` (from `Bus::consumer_lag`
/// and from the exported series alike), failing after a while with what was seen.
async fn wait_lag(bus: &Arc<dyn Bus>, kind: &str, want: (u64, u64), render: &dyn Fn() -> String) {
    let labels = [
        ("app", "busway"),
        ("bus", "orders"),
        ("transport", kind),
        ("mode", "stream"),
        ("group", "audit"),
    ];
    let start = Instant::now();
    loop {
        let direct = bus.consumer_lag().await.expect("consumer_lag");
        let direct = direct
            .iter()
            .find(|g| g.group == "audit")
            .map(|g| (g.lag, g.pending));
        busway::metrics::scrape().await;
        let text = render();
        let exported = (
            value(&text, busway::metrics::CONSUMER_LAG, &labels),
            value(&text, busway::metrics::CONSUMER_PENDING, &labels),
        );
        let (lag, pending) = (want.0 as f64, want.1 as f64);
        if direct == Some((Some(want.0), want.1)) && exported == (Some(lag), Some(pending)) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "want lag, pending {want:?}; consumer_lag says {direct:?}, the exposition {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that the consumer lag of group `audit` on `topic` follows what the group read:
/// 100 published while the group reads nothing → lag 100, pending 0; all 100 received and
/// not acked → lag 0, pending 100; all acked → 0 and 0. `bus` is in stream mode and reports
/// `kind`; `topic` is one it stores.
pub async fn consumer_lag_follows_a_group(
    bus: Arc<dyn Bus>,
    kind: &str,
    topic: &str,
    render: &dyn Fn() -> String,
) {
    render();
    let router = router(&bus, topic);
    let pattern = Pattern::new(topic).expect("pattern");
    let options = SubscribeOptions::new().group("audit");
    // The group exists from its first subscription on and keeps its place without one.
    drop(
        bus.subscribe(pattern.clone(), options.clone())
            .await
            .expect("subscribe"),
    );
    let t = Topic::new(topic).expect("topic");
    for i in 0..100 {
        router
            .publish(Message::new(t.clone(), format!("{i}")))
            .await
            .expect("publish");
    }
    wait_lag(&bus, kind, (100, 0), render).await;

    let mut sub = bus.subscribe(pattern, options).await.expect("subscribe");
    let mut held = Vec::new();
    for _ in 0..100 {
        let d = sub
            .recv_timeout(WAIT)
            .await
            .expect("a delivery in time")
            .expect("the subscription open");
        held.push(d);
    }
    wait_lag(&bus, kind, (0, 100), render).await;
    busway::Delivery::ack_all(&held).await.expect("ack");
    wait_lag(&bus, kind, (0, 0), render).await;
    drop(sub);
    router.close().await.expect("close");
}
