//! Shared helpers: build a NATS bus on a test server.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use busway::{
    config::BusConfig, transport::BuildContext, Delivery, Mode, Overflow, Result, Subscription,
};
use busway_nats::{NatsBus, NatsConfig};

/// Deliveries wait this long at most (a loaded 2-core machine).
pub const WAIT: Duration = Duration::from_secs(10);

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
    let mut config = BusConfig::new("nats");
    config.url = Some(url.to_string());
    config.mode = mode;
    config.overflow = overflow;
    config.options = toml::from_str(extra).expect("test TOML");
    let ctx = BuildContext {
        app: "test",
        bus: name,
        config: &config,
        source: "test.toml",
    };
    NatsBus::connect(NatsConfig::from_context(&ctx)?).await
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
