//! Credentials on a real nats-server: missing or wrong ones fail fast with `Auth` and no
//! retry storm; right ones work; no secret appears in errors, `Debug` or the logs.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Mode};
use busway_testkit::nats::{NatsServer, NatsServerOptions};
use common::connect;

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

/// Connects with `keys` and checks a message makes the round trip.
async fn connects(url: &str, keys: &str) -> busway_nats::NatsBus {
    let bus = connect(url, "sec", Mode::Broadcast, keys)
        .await
        .unwrap_or_else(|e| panic!("{keys:?}: {e}"));
    common::round_trip(&bus, "s.x", "ok").await;
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

    let bus = connects(&url, "user = \"alice\"\npassword = \"Pa55-w0rd-xyz\"").await;
    texts.push(format!("{bus:?}"));
    let bus = connects(&url.replace("nats://", "nats://alice:Pa55-w0rd-xyz@"), "").await;
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
    let bus = connects(&url, "token = \"T0ken-secret-123\"").await;
    texts.push(format!("{bus:?}"));
    let bus = connects(&url.replace("nats://", "nats://T0ken-secret-123@"), "").await;
    texts.push(format!("{bus:?}"));
    texts.push(logs.text());
    for text in &texts {
        for secret in ["T0ken-secret-123", "T0ken-wrong-456"] {
            assert!(!text.contains(secret), "{secret} printed in:\n{text}");
        }
    }
}

/// `authorization { users = [ { nkey } ] }` for the public key of `user`.
fn nkey_users(user: &nkeys::KeyPair) -> NatsServerOptions {
    NatsServerOptions {
        extra_conf: Some(format!(
            "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}",
            user.public_key()
        )),
        ..Default::default()
    }
}

#[tokio::test]
async fn nkey_missing_or_wrong_is_a_fast_auth_error_and_the_seed_never_printed() {
    let logs = busway_testkit::logs::capture();
    let user = nkeys::KeyPair::new_user();
    let Some(server) = NatsServer::start_with("nats_nkey", nkey_users(&user)) else {
        return;
    };
    let url = server.url();
    let seed = user.seed().unwrap();
    let wrong = nkeys::KeyPair::new_user().seed().unwrap();
    let mut texts = vec![
        refused(&server, &url, "").await,
        refused(&server, &url, &format!("nkey = \"{wrong}\"")).await,
    ];
    // Not a seed at all: refused before any connection, naming the key and not its value.
    let err = connect(&url, "sec", Mode::Broadcast, "nkey = \"SUNOTASEED-secret\"")
        .await
        .expect_err("a malformed seed cannot connect");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("buses.sec.nkey"),
        "names the key: {err}"
    );
    texts.push(format!("{err} {err:?}"));

    let bus = connects(&url, &format!("nkey = \"{seed}\"")).await;
    texts.push(format!("{bus:?}"));
    texts.push(logs.text());
    for text in &texts {
        for secret in [seed.as_str(), wrong.as_str(), "SUNOTASEED-secret"] {
            assert!(!text.contains(secret), "a seed printed in:\n{text}");
        }
    }
}

/// A `.creds` file (in the format `nsc` writes) for a new user named `name` whose JWT
/// `account` signed; returns its path, the user's JWT and its NKey seed.
fn creds_file(
    dir: &std::path::Path,
    name: &str,
    account: &nkeys::KeyPair,
) -> (String, String, String) {
    let user = nkeys::KeyPair::new_user();
    let jwt = nats_jwt::Token::new_user(account.public_key(), user.public_key())
        .name(name)
        .sign(account);
    let seed = user.seed().unwrap();
    let path = dir.join(format!("{name}.creds"));
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    std::fs::write(&path, text).unwrap();
    (path.display().to_string(), jwt, seed)
}

#[tokio::test]
async fn creds_file_of_a_trusted_account_connects_and_others_are_refused() {
    use nats_jwt::Token;
    let logs = busway_testkit::logs::capture();
    // Decentralised auth: the server trusts an operator key; the operator signed the
    // account's JWT, the account signed the user's.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let account_jwt = Token::new_account(account.public_key())
        .name("platform")
        .sign(&operator);
    // The server's own account (JetStream needs one in this mode).
    let system = nkeys::KeyPair::new_account();
    let system_jwt = Token::new_account(system.public_key())
        .name("SYS")
        .sign(&operator);
    let options = NatsServerOptions {
        extra_conf: Some(format!(
            "trusted_keys: [\"{}\"]\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{account_jwt}\"\n  {}: \"{system_jwt}\"\n}}",
            operator.public_key(),
            system.public_key(),
            account.public_key(),
            system.public_key()
        )),
        ..Default::default()
    };
    let Some(server) = NatsServer::start_with("nats_creds", options) else {
        return;
    };
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();

    let (good, user_jwt, seed) = creds_file(dir.path(), "engine", &account);
    // A user signed by an account the operator never signed.
    let (bad, _, rogue_seed) = creds_file(dir.path(), "rogue", &nkeys::KeyPair::new_account());

    let mut texts = vec![
        refused(&server, &url, "").await,
        refused(&server, &url, &format!("creds = \"{bad}\"")).await,
    ];
    // A file that is not there: a config error naming the key, before any connection.
    let missing = dir.path().join("missing.creds").display().to_string();
    let err = connect(
        &url,
        "sec",
        Mode::Broadcast,
        &format!("creds = \"{missing}\""),
    )
    .await
    .expect_err("a missing creds file cannot connect");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("buses.sec.creds"),
        "names the key: {err}"
    );
    texts.push(format!("{err} {err:?}"));

    let bus = connects(&url, &format!("creds = \"{good}\"")).await;
    texts.push(format!("{bus:?}"));
    texts.push(logs.text());
    for text in &texts {
        for secret in [seed.as_str(), rogue_seed.as_str(), user_jwt.as_str()] {
            assert!(!text.contains(secret), "a credential printed in:\n{text}");
        }
    }
}
