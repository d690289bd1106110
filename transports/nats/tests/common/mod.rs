//! Shared helpers: build a NATS bus on a test server.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use busway::{
    config::BusConfig, transport::BuildContext, Bus, Delivery, Message, Mode, Overflow, Pattern,
    Result, SubscribeOptions, Subscription, Topic,
};
use busway_nats::{NatsBus, NatsConfig};

/// Deliveries wait this long at most (a loaded 2-core machine).
pub const WAIT: Duration = Duration::from_secs(10);

/// `s` as a topic (a test's literal, valid).
pub fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

/// `s` as a pattern (a test's literal, valid).
pub fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

/// Connects bus `name` in `mode` to `url` with extra NATS keys (TOML).
pub async fn connect(url: &str, name: &str, mode: Mode, extra: &str) -> Result<NatsBus> {
    connect_with(url, name, mode, extra, None).await
}

/// As [`connect`], with the bus's default overflow policy (`overflow` in its config).
pub async fn connect_with(
    url: &str,
    name: &str,
    mode: Mode,
    extra: &str,
    overflow: Option<Overflow>,
) -> Result<NatsBus> {
    let config = bus_config(url, mode, extra, overflow);
    let ctx = context(name, &config);
    NatsBus::connect(NatsConfig::from_context(&ctx)?).await
}

/// The config of a NATS bus on `url` in `mode` with extra NATS keys (TOML) and default
/// overflow policy `overflow`.
pub fn bus_config(url: &str, mode: Mode, extra: &str, overflow: Option<Overflow>) -> BusConfig {
    let mut config = BusConfig::new("nats");
    config.url = Some(url.to_string());
    config.mode = mode;
    config.overflow = overflow;
    config.options = toml::from_str(extra).expect("test TOML");
    config
}

/// What the registry hands the factory for bus `name` of app `test`, from `test.toml`.
pub fn context<'a>(name: &'a str, config: &'a BusConfig) -> BuildContext<'a> {
    BuildContext {
        app: "test",
        bus: name,
        config,
        source: "test.toml",
    }
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(sub: &mut Subscription) -> Delivery {
    sub.recv_timeout(WAIT)
        .await
        .expect("a delivery within the wait")
        .expect("subscription still open")
}

/// Waits until `cond` holds (polling), failing with `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribes to `subject` on `bus`, publishes `payload` there and checks it arrives.
pub async fn round_trip(bus: &NatsBus, subject: &str, payload: &str) {
    let mut sub = bus
        .subscribe(pattern(subject), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic(subject), payload.to_string()))
        .await
        .unwrap();
    assert_eq!(
        &next(&mut sub).await.message().payload[..],
        payload.as_bytes()
    );
}
