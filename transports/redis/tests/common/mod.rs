//! What the Redis test files share: buses on a spawned server, names, waiting, and the
//! factory's answer to a config.

// Each test file is its own crate and uses some of these.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use busway::transport::{BuildContext, TransportFactory};
use busway::{Delivery, ErrorKind, Mode, Pattern, Subscription, Topic};
use busway_redis::{RedisBus, RedisConfig, RedisFactory};

/// How long a test waits for what should come.
pub const WAIT: Duration = Duration::from_secs(10);

/// A bus named `bus` of app `test` on `url` in `mode`, its config changed by `f`.
pub async fn connect(
    bus: &str,
    url: &str,
    mode: Mode,
    f: impl FnOnce(&mut RedisConfig),
) -> RedisBus {
    let mut config = RedisConfig::new(bus, url).app("test").mode(mode);
    f(&mut config);
    RedisBus::connect(config).await.expect("connect")
}

pub fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

pub fn pat(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

/// The next delivery, within [`WAIT`].
pub async fn next(sub: &mut Subscription) -> Delivery {
    sub.recv_timeout(WAIT).await.unwrap().expect("a delivery")
}

/// Waits until `cond` holds, failing after [`WAIT`].
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that bus `main` in `cfg.toml`, whose table is `transport = "redis"` plus `body`,
/// is refused with `InvalidConfig` starting with `want`, by `RedisFactory::validate` (no
/// server needed) and by `build` alike, without printing a password.
pub async fn assert_refused(body: &str, want: &str) {
    let err = config_error(body).await;
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().starts_with(want),
        "want {want:?}, got {err}"
    );
    assert!(!format!("{err} {err:?}").contains(":pw@"), "{err}");
}

/// The error of bus `main` in `cfg.toml` whose table is `transport = "redis"` plus `body`:
/// what `RedisFactory::validate` says, without connecting, checked to be what `build` says.
pub async fn config_error(body: &str) -> busway::Error {
    let text = format!("[buses.main]\ntransport = \"redis\"\n{body}\n");
    let config = busway::Config::from_toml(&text, "cfg.toml").unwrap();
    let ctx = || BuildContext {
        app: "test",
        bus: "main",
        config: &config.buses["main"],
        source: "cfg.toml",
    };
    let refused = RedisFactory
        .validate(ctx())
        .expect_err("validate refuses it");
    let built = RedisFactory
        .build(ctx())
        .await
        .expect_err("build refuses it");
    assert_eq!(
        (refused.kind(), refused.to_string()),
        (built.kind(), built.to_string()),
        "validate and build disagree"
    );
    refused
}
