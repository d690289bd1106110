//! What an operator reads: a flush with nothing pending on a frozen broker, timeouts that
//! say how long was waited, errors that name the right key and hint at the likely mistake.
//! Each test that needs a server starts its own.

mod common;

use std::time::{Duration, Instant};

use busway::{Bus, ErrorKind, Message, Mode};
use busway_redis::{RedisBus, RedisConfig};
use busway_testkit::redis::RedisServer;

use common::{assert_refused, connect, topic};

#[tokio::test]
async fn flush_and_close_with_nothing_pending_succeed_at_once_on_a_frozen_broker() {
    let Some(server) = RedisServer::start("flush_nothing_frozen") else {
        return;
    };
    let bus = connect("a", &server.url(), Mode::Broadcast, |c| {
        c.publish_timeout = Duration::from_millis(800);
    })
    .await;
    server.pause();
    // Let the writer's idle ping start waiting on the frozen server.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let start = Instant::now();
    bus.flush().await.expect("nothing to flush");
    bus.close().await.expect("nothing to flush on close");
    let took = start.elapsed();
    server.resume();
    assert!(
        took < Duration::from_millis(300),
        "flush + close took {took:?}"
    );
}

#[tokio::test]
async fn a_publish_that_gives_up_says_how_long_it_waited() {
    let Some(server) = RedisServer::start("publish_timeout_truthful") else {
        return;
    };
    let timeout = Duration::from_millis(1000);
    let bus = connect("a", &server.url(), Mode::Stream, |c| {
        c.publish_timeout = timeout;
        c.publish_queue = 1;
        c.max_batch = 1;
    })
    .await;
    server.pause();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = bus
                .publish(Message::new(topic("t"), format!("{i}").into_bytes()))
                .await;
            (start.elapsed(), r)
        }));
    }
    let mut worst = Duration::ZERO;
    for t in tasks {
        let (took, r) = t.await.unwrap();
        let err = r.expect_err("the broker is frozen");
        assert!(
            matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Connection),
            "{err}"
        );
        if err.kind() == ErrorKind::Timeout {
            assert!(err.to_string().contains("publish_timeout = 1s"), "{err}");
        }
        worst = worst.max(took);
    }
    server.resume();
    assert!(
        worst < timeout + Duration::from_millis(400),
        "a publish gave up after {worst:?} with publish_timeout = {timeout:?}"
    );
}

#[tokio::test]
async fn zero_sizes_are_refused_under_their_own_key() {
    for key in ["max_batch", "publish_queue", "read_count"] {
        assert_refused(
            &format!("url = \"redis://127.0.0.1:1\"\n{key} = 0"),
            &format!("cfg.toml: buses.main.{key}: must be at least 1"),
        )
        .await;
    }
}

#[tokio::test]
async fn rediss_against_a_plain_server_hints_at_tls() {
    let Some(server) = RedisServer::start("rediss_plain") else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let mut config = RedisConfig::new("a", url).app("test");
    config.connect_timeout = Duration::from_millis(500);
    config.publish_timeout = Duration::from_millis(500);
    let err = RedisBus::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.to_string().contains("does the server speak TLS"),
        "{err}"
    );
}

#[tokio::test]
async fn a_port_that_is_not_redis_is_named_in_one_line() {
    // What a NATS server says first on every connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = sock
                    .write_all(b"INFO {\"server_id\":\"x\",\"version\":\"2.9.0\",\"max_payload\":1048576}\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let mut config = RedisConfig::new("a", format!("redis://127.0.0.1:{port}")).app("test");
    config.connect_timeout = Duration::from_millis(500);
    config.publish_timeout = Duration::from_millis(500);
    let err = RedisBus::connect(config).await.unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.contains("does not look like a Redis server"), "{text}");
    assert!(text.contains("\"a\""), "{text}");
}
