//! Credentials on a real nats-server: missing or wrong ones fail fast with `Auth` and no
//! retry storm; right ones work; no secret appears in errors, `Debug` or the logs.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Message, Mode, Pattern, SubscribeOptions, Topic};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::{connect, next};

/// "Fast": well under any retry loop, generous for a loaded 2-core machine.
const FAST: Duration = Duration::from_secs(3);

/// Failed authentications the server logged so far.
fn auth_failures(server: &NatsServer) -> usize {
    server
        .log()
        .lines()
        .filter(|l| l.contains("uthorization Violation") || l.contains("uthentication error"))
        .count()
}

/// Connects with `keys` expecting an `Auth` error within [`FAST`] after at most two attempts
/// seen by the server (and none later: no background retries); returns the error text.
async fn refused(server: &NatsServer, url: &str, keys: &str) -> String {
    let before = auth_failures(server);
    let start = Instant::now();
    let err = connect(url, "sec", Mode::Broadcast, keys)
        .await
        .expect_err("the server must refuse these credentials");
    let took = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::Auth, "{keys:?}: {err}");
    assert!(took < FAST, "{keys:?}: the Auth error took {took:?}");
    assert!(err.to_string().contains("\"sec\""), "names the bus: {err}");
    // Give a retry loop, if there were one, time to show itself in the server log.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = auth_failures(server) - before;
    assert!(
        (1..=2).contains(&attempts),
        "{keys:?}: the server saw {attempts} failed attempts:\n{}",
        server.log()
    );
    format!("{err} {err:?}")
}

async fn round_trip(url: &str, keys: &str) -> busway_nats::NatsBus {
    let bus = connect(url, "sec", Mode::Broadcast, keys)
        .await
        .unwrap_or_else(|e| panic!("{keys:?}: {e}"));
    let mut sub = bus
        .subscribe(Pattern::new("s.x").unwrap(), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(Message::new(Topic::new("s.x").unwrap(), "ok"))
        .await
        .unwrap();
    assert_eq!(&next(&mut sub).await.message().payload[..], b"ok");
    bus
}

#[tokio::test]
async fn user_password_missing_or_wrong_is_a_fast_auth_error_and_never_printed() {
    let logs = busway_testkit::logs::capture();
    let options = NatsServerOptions {
        user_password: Some(("alice".into(), "Pa55-w0rd-xyz".into())),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("nats_user_password", options) else {
        return;
    };
    let url = server.url();
    let mut texts = vec![
        refused(&server, &url, "").await,
        refused(
            &server,
            &url,
            "user = \"alice\"\npassword = \"Wr0ng-pw-abc\"",
        )
        .await,
        refused(
            &server,
            &url,
            "user = \"mallory\"\npassword = \"Pa55-w0rd-xyz\"",
        )
        .await,
    ];
    let in_url = url.replace("nats://", "nats://alice:Wr0ng-pw-abc@");
    texts.push(refused(&server, &in_url, "").await);

    let bus = round_trip(&url, "user = \"alice\"\npassword = \"Pa55-w0rd-xyz\"").await;
    texts.push(format!("{bus:?}"));
    let bus = round_trip(&url.replace("nats://", "nats://alice:Pa55-w0rd-xyz@"), "").await;
    texts.push(format!("{bus:?} {:?}", bus.stats()));
    texts.push(logs.text());
    for text in &texts {
        for secret in ["Pa55-w0rd-xyz", "Wr0ng-pw-abc"] {
            assert!(!text.contains(secret), "{secret} printed in:\n{text}");
        }
    }
}

#[tokio::test]
async fn token_missing_or_wrong_is_a_fast_auth_error_and_never_printed() {
    let logs = busway_testkit::logs::capture();
    let options = NatsServerOptions {
        token: Some("T0ken-secret-123".into()),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("nats_token", options) else {
        return;
    };
    let url = server.url();
    let mut texts = vec![
        refused(&server, &url, "").await,
        refused(&server, &url, "token = \"T0ken-wrong-456\"").await,
        refused(
            &server,
            &url.replace("nats://", "nats://T0ken-wrong-456@"),
            "",
        )
        .await,
    ];
    let bus = round_trip(&url, "token = \"T0ken-secret-123\"").await;
    texts.push(format!("{bus:?}"));
    let bus = round_trip(&url.replace("nats://", "nats://T0ken-secret-123@"), "").await;
    texts.push(format!("{bus:?}"));
    texts.push(logs.text());
    for text in &texts {
        for secret in ["T0ken-secret-123", "T0ken-wrong-456"] {
            assert!(!text.contains(secret), "{secret} printed in:\n{text}");
        }
    }
}
