//! Every kind of invalid config, run through the real loading path (`Config::from_toml`, then
//! `Router::from_config` with the CLI's registry: memory, redis, nats): each error is
//! `InvalidConfig` (`UnknownTransport` for an unknown transport) and names the file, the key
//! and the reason; `busway check` refuses the same config with the same message, without
//! connecting. docs/CONFIG_ERRORS.md lists these messages; the test fails if one of them is
//! not there word for word.

use busway::{Config, ErrorKind, Router};

const FILE: &str = "platform.toml";

/// (what is wrong, config text, the key the message must name)
const CASES: &[(&str, &str, &str)] = &[
    ("TOML syntax", "[buses\n", "(line 1)"),
    ("unknown top-level key", "bogus = 1\n", "bogus"),
    ("unknown key in [app]", "[app]\nnam = \"x\"\n", "nam"),
    ("invalid app name", "[app]\nname = \"my app\"\n", "app.name"),
    ("invalid bus name", "[buses.\"a.b\"]\ntransport = \"memory\"\n", "buses.a.b"),
    ("missing transport", "[buses.a]\nmode = \"stream\"\n", "buses.a"),
    ("unknown transport", "[buses.a]\ntransport = \"kafka\"\n", "buses.a.transport"),
    ("unknown mode", "[buses.a]\ntransport = \"memory\"\nmode = \"strem\"\n", "buses.a"),
    ("unknown overflow policy", "[buses.a]\ntransport = \"memory\"\noverflow = \"dropp\"\n", "buses.a"),
    ("wrong type (core key)", "[buses.a]\ntransport = \"memory\"\ncapacity = \"big\"\n", "buses.a"),
    ("unknown memory key", "[buses.a]\ntransport = \"memory\"\nretian = 5\n", "retian"),
    ("unknown redis key", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nbogus = 1\n", "bogus"),
    ("wrong type (redis key)", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\npublish_buffer = \"lots\"\n", "buses.a"),
    ("misspelt redis key", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nframng = \"raw\"\n", "framng"),
    ("renamed redis key", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nbuffer_max = 5\n", "buses.a.buffer_max"),
    ("renamed redis duration key", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nresponse_timeout_ms = 5000\n", "buses.a.response_timeout_ms"),
    ("unknown nats key", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\nframming = \"raw\"\n", "framming"),
    ("wrong type (nats key)", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\nmax_deliveries = \"five\"\n", "buses.a"),
    ("renamed nats key", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\nmax_deliver = 5\n", "buses.a.max_deliver"),
    ("duration without a unit", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\npublish_timeout = \"forever\"\n", "buses.a"),
    ("capacity zero", "[buses.a]\ntransport = \"memory\"\ncapacity = 0\n", "buses.a.capacity"),
    ("redis url missing", "[buses.a]\ntransport = \"redis\"\n", "buses.a.url"),
    ("redis url of another scheme", "[buses.a]\ntransport = \"redis\"\nurl = \"http://u:pw@h\"\n", "buses.a.url"),
    ("redis url unparsable", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://h:notaport\"\n", "buses.a.url"),
    ("nats url of another scheme", "[buses.a]\ntransport = \"nats\"\nurl = \"redis://u:pw@h:1\"\n", "buses.a.url"),
    ("redis: inconsistent keys", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmax_deliveries = 3\n", "buses.a.max_deliveries"),
    ("redis: unframed in stream mode", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nunframed = \"deliver\"\n", "buses.a.unframed"),
    ("redis: tls key without rediss://", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\ntls_ca = \"ca.pem\"\n", "buses.a.tls_ca"),
    ("redis: layout that does not parse", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\n[[buses.a.layout.streams]]\ntopic = \"md.{type\"\nkey = \"k\"\n", "buses.a.layout"),
    ("redis: layout key field not in the topic", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\n[[buses.a.layout.streams]]\ntopic = \"engine.{type}\"\nkey = \"nautilus-{engine}-streams\"\n", "buses.a.layout"),
    ("redis: layout on a broadcast bus", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n[[buses.a.layout.streams]]\ntopic = \"md.{type}\"\nkey = \"k\"\n", "buses.a.layout"),
    ("redis: key_prefix beside a layout", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nkey_prefix = \"x:\"\n[[buses.a.layout.streams]]\ntopic = \"md.{type}\"\nkey = \"k\"\n", "buses.a.key_prefix"),
    ("redis: unknown layout key", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\n[buses.a.layout]\npayload_field = \"p\"\n", "payload_field"),
    ("redis: consumer name placeholder", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nconsumer = \"{engine}-consumer-1\"\n", "buses.a.consumer"),
    ("nats: durable name without {group}", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\nmode = \"stream\"\ndurable = \"portfolio\"\n", "buses.a.durable"),
    ("redis sentinel url without a master name", "[buses.a]\ntransport = \"redis\"\nurl = \"redis+sentinel://u:pw@127.0.0.1:26379,127.0.0.1:26380\"\n", "buses.a.url"),
    ("redis: stream mode on a cluster", "[buses.a]\ntransport = \"redis\"\nurl = \"redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001\"\nmode = \"stream\"\n", "buses.a.mode"),
    ("redis: min_replicas in broadcast mode", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmin_replicas = 1\n", "buses.a.min_replicas"),
    ("redis: min_replicas_timeout not below publish_timeout", "[buses.a]\ntransport = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nmode = \"stream\"\nmin_replicas = 1\nmin_replicas_timeout = \"5s\"\n", "buses.a.min_replicas_timeout"),
    ("nats: user without password", "[buses.a]\ntransport = \"nats\"\nurl = \"nats://127.0.0.1:1\"\nuser = \"x\"\n", "buses.a.password"),
    ("invalid route pattern", "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"x.>.y\"\nto = \"a\"\n", "routes[0].match"),
    ("unknown key in a route", "[buses.a]\ntransport = \"memory\"\n[[routes]]\npattern = \"x\"\nto = \"a\"\n", "routes[0]"),
    ("route to an unknown bus", "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"x.>\"\nto = \"b\"\n", "routes[0].to"),
    ("route to no bus", "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"x.>\"\nto = []\n", "routes[0].to"),
    ("default to an unknown bus", "[buses.a]\ntransport = \"memory\"\n[default]\nto = \"nope\"\n", "default.to"),
    ("shadowed route", "[buses.a]\ntransport = \"memory\"\n[[routes]]\nmatch = \"md.>\"\nto = \"a\"\n[[routes]]\nmatch = \"md.quotes.*\"\nto = \"a\"\n", "routes[1]"),
    ("no bus at all", "[default]\nto = []\n", "default"),
];

async fn load(text: &str) -> busway::Result<Router> {
    let config = Config::from_toml(text, FILE)?;
    Router::from_config(&config, &busway_cli::registry()).await
}

#[tokio::test]
async fn every_invalid_config_names_file_key_and_reason_and_is_documented() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/CONFIG_ERRORS.md"
    ))
    .expect("docs/CONFIG_ERRORS.md");
    let mut undocumented = Vec::new();
    for (what, text, key) in CASES {
        let err = match load(text).await {
            Ok(_) => panic!("{what}: accepted:\n{text}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        println!("| {what} | `` {} `` |", msg.replace('|', "\\|"));
        let kind = if *what == "unknown transport" {
            ErrorKind::UnknownTransport
        } else {
            ErrorKind::InvalidConfig
        };
        assert_eq!(err.kind(), kind, "{what}: {msg}");
        assert!(
            msg.starts_with(FILE),
            "{what}: does not name the file: {msg}"
        );
        assert!(msg.contains(key), "{what}: does not name {key:?}: {msg}");
        assert!(!msg.contains(":pw@"), "{what}: shows a password: {msg}");
        // The reason follows the key.
        assert!(
            msg.len() > FILE.len() + key.len() + 10,
            "{what}: no reason: {msg}"
        );
        // `check` refuses it too, with the same words (the file is named by its path).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, text).unwrap();
        match busway_cli::commands::check(&path, &busway_cli::registry()) {
            Ok(report) => panic!("{what}: check accepted it:\n{report}"),
            Err(e) => assert_eq!(
                e.to_string().replacen(&path.display().to_string(), FILE, 1),
                msg,
                "{what}: check and build disagree"
            ),
        }
        if !doc.contains(&msg.replace('|', "\\|")) {
            undocumented.push(msg);
        }
    }
    assert!(
        undocumented.is_empty(),
        "messages missing from docs/CONFIG_ERRORS.md:\n{}",
        undocumented.join("\n")
    );
}
