//! Credentials on a real redis-server (`requirepass` and an ACL user): missing or wrong ones
//! fail fast with `Auth` and no retry storm; right ones work in both modes; no secret
//! appears in errors, `Debug` or the logs.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Message, Mode, SubscribeOptions};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::redis::RedisServer;

use common::{pat, topic, WAIT};
/// "Fast": well under any retry loop, generous for a loaded 2-core machine.
const FAST: Duration = Duration::from_secs(3);
const ADMIN: &str = "Adm1n-secret-pw";
const ALICE: &str = "Al1ce-secret-pw";
const WRONG: &str = "Wr0ng-secret-pw";

/// `total_connections_received` from `INFO stats`.
fn connections_received(server: &RedisServer) -> u64 {
    server
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

/// Connects to `url` expecting `Auth` within [`FAST`], with at most two connections seen by
/// the server (and none later: no background retries); returns the error text.
async fn refused(server: &RedisServer, url: String, mode: Mode) -> String {
    let before = connections_received(server);
    let start = Instant::now();
    let err = RedisBus::connect(RedisConfig::new("sec", url.clone()).mode(mode))
        .await
        .expect_err("the server must refuse these credentials");
    let took = start.elapsed();
    assert_eq!(
        err.kind(),
        ErrorKind::Auth,
        "{}: {err}",
        busway::transport::redact_url(&url)
    );
    assert!(took < FAST, "the Auth error took {took:?}");
    assert!(err.to_string().contains("\"sec\""), "names the bus: {err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Every `cli` call is a connection too: the one of `before` is counted in `after`.
    let attempts = connections_received(server) - before - 1;
    assert!(
        (1..=2).contains(&attempts),
        "the server saw {attempts} connections for one failed connect"
    );
    format!("{err} {err:?}")
}

async fn round_trip(url: String, mode: Mode) -> String {
    let bus = RedisBus::connect(RedisConfig::new("sec", url).mode(mode))
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    let mut sub = bus
        .subscribe(pat("s.x"), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(topic("s.x"), "ok")).await.unwrap();
    let d = sub.recv_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.message().payload[..], b"ok", "{mode:?}");
    let _ = d.ack().await;
    let text = format!("{bus:?} {:?}", bus.stats());
    bus.close().await.unwrap();
    text
}

#[tokio::test]
async fn requirepass_and_acl_user_fail_fast_work_when_right_and_never_print_secrets() {
    let logs = busway_testkit::logs::capture();
    let Some(server) = RedisServer::start_with_password("redis_security", ADMIN) else {
        return;
    };
    let created = server.cli(&[
        "ACL",
        "SETUSER",
        "alice",
        "on",
        &format!(">{ALICE}"),
        "~*",
        "&*",
        "+@all",
    ]);
    assert_eq!(created.trim(), "OK", "ACL SETUSER: {created}");
    let port = server.port();
    let mut texts = Vec::new();
    for mode in [Mode::Broadcast, Mode::Stream] {
        // Missing credentials (NOAUTH), a wrong password for default and for alice, an
        // unknown user with a right password.
        texts.push(refused(&server, format!("redis://127.0.0.1:{port}"), mode).await);
        texts.push(refused(&server, format!("redis://:{WRONG}@127.0.0.1:{port}"), mode).await);
        texts.push(
            refused(
                &server,
                format!("redis://alice:{WRONG}@127.0.0.1:{port}"),
                mode,
            )
            .await,
        );
        texts.push(
            refused(
                &server,
                format!("redis://mallory:{ALICE}@127.0.0.1:{port}"),
                mode,
            )
            .await,
        );
        // requirepass and the ACL user both work.
        texts.push(round_trip(format!("redis://:{ADMIN}@127.0.0.1:{port}"), mode).await);
        texts.push(round_trip(format!("redis://alice:{ALICE}@127.0.0.1:{port}"), mode).await);
    }
    let config = RedisConfig::new("sec", format!("redis://alice:{ALICE}@127.0.0.1:{port}"));
    texts.push(format!("{config:?}"));
    texts.push(logs.text());
    for text in &texts {
        for secret in [ADMIN, ALICE, WRONG] {
            assert!(!text.contains(secret), "{secret} printed in:\n{text}");
        }
    }
}
