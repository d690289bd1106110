//! Router behaviour: routing decisions, validation errors, wildcard subscriptions across buses
//! with the routing filter, mirrors, unsubscribe on drop, close.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use busway::{
    router::RoutingTable,
    transport::{BuildContext, TransportFactory},
    Bus, Config, ErrorKind, MemoryBus, Message, Overflow, Pattern, Registry, Router, StartFrom,
    SubscribeOptions, Subscription, Topic,
};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

fn mem(name: &str) -> Arc<dyn Bus> {
    Arc::new(MemoryBus::new(name))
}

fn topic(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

fn msg(t: &str, payload: &str) -> Message {
    Message::new(topic(t), payload.as_bytes().to_vec())
}

/// A router and its buses md, engine, main.
type Platform = (Router, Arc<dyn Bus>, Arc<dyn Bus>, Arc<dyn Bus>);

/// marketdata.> -> md; engine.> -> engine; mirror.> -> md + engine; default main.
fn platform() -> Platform {
    let (md, engine, main) = (mem("md"), mem("engine"), mem("main"));
    let router = Router::builder()
        .bus("md", md.clone())
        .bus("engine", engine.clone())
        .bus("main", main.clone())
        .route("marketdata.>", &["md"])
        .route("engine.>", &["engine"])
        .route("mirror.>", &["md", "engine"])
        .default_to(&["main"])
        .build()
        .unwrap();
    (router, md, engine, main)
}

fn names(list: &[Arc<str>]) -> Vec<&str> {
    list.iter().map(|s| &**s).collect()
}

async fn next(sub: &mut Subscription) -> Message {
    sub.recv_timeout(WAIT)
        .await
        .expect("a delivery in time")
        .expect("subscription still open")
        .into_message()
}

fn error_text<T: std::fmt::Debug>(r: busway::Result<T>, kind: ErrorKind) -> String {
    let e = r.expect_err("an error");
    assert_eq!(e.kind(), kind, "{e}");
    e.to_string()
}

#[test]
fn first_match_wins_then_default() {
    let (md, engine, main) = (mem("md"), mem("engine"), mem("main"));
    let router = Router::builder()
        .bus("md", md)
        .bus("engine", engine)
        .bus("main", main)
        .route("marketdata.quotes.*", &["md"])
        .route("marketdata.>", &["engine"])
        .default_to(&["main"])
        .build()
        .unwrap();
    assert_eq!(
        names(&router.route(&topic("marketdata.quotes.AAPL")).unwrap()),
        ["md"]
    );
    assert_eq!(
        names(&router.route(&topic("marketdata.trades.AAPL")).unwrap()),
        ["engine"]
    );
    // `quotes.*` takes exactly one token after `quotes`; the longer topic falls through.
    assert_eq!(
        names(&router.route(&topic("marketdata.quotes.AAPL.x")).unwrap()),
        ["engine"]
    );
    assert_eq!(
        names(&router.route(&topic("orders.new")).unwrap()),
        ["main"]
    );
    // The cached answer and the table's own scan agree.
    let table = router.table();
    for t in [
        "marketdata.quotes.AAPL",
        "marketdata.trades.AAPL",
        "orders.new",
    ] {
        assert_eq!(
            names(table.lookup(&topic(t)).unwrap()),
            names(&router.route(&topic(t)).unwrap())
        );
    }
}

#[tokio::test]
async fn publish_goes_to_the_routed_bus_only() {
    let (router, md, engine, main) = platform();
    let mut on_md = md
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut on_engine = engine
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut on_main = main
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();
    router
        .publish(msg("marketdata.quotes.AAPL", "q"))
        .await
        .unwrap();
    router.publish(msg("engine.orders", "o")).await.unwrap();
    router
        .publish(msg("portfolio.positions", "p"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut on_md).await.topic.as_str(),
        "marketdata.quotes.AAPL"
    );
    assert_eq!(next(&mut on_engine).await.topic.as_str(), "engine.orders");
    assert_eq!(
        next(&mut on_main).await.topic.as_str(),
        "portfolio.positions"
    );
    assert_eq!(on_md.pending() + on_engine.pending() + on_main.pending(), 0);
    // Per-bus stats say where things went; the router's stats are their sum.
    let per_bus = router.bus_stats();
    let published: Vec<(&str, u64)> = per_bus
        .iter()
        .map(|(n, s)| (n.as_str(), s.published))
        .collect();
    assert_eq!(published, [("engine", 1), ("main", 1), ("md", 1)]);
    assert_eq!(router.stats().published, 3);
}

#[tokio::test]
async fn no_route_names_the_topic() {
    let router = Router::builder()
        .bus("md", mem("md"))
        .route("marketdata.>", &["md"])
        .build()
        .unwrap();
    let text = error_text(
        router.publish(msg("orders.new", "x")).await,
        ErrorKind::NoRoute,
    );
    assert_eq!(
        text,
        "no route for topic \"orders.new\": no rule matches it and the routing table has no default bus"
    );
    error_text(router.route(&topic("orders.new")), ErrorKind::NoRoute);
    error_text(
        router.table().lookup(&topic("orders.new")),
        ErrorKind::NoRoute,
    );
    let text = error_text(
        router
            .subscribe(pattern("orders.*"), SubscribeOptions::new())
            .await,
        ErrorKind::NoRoute,
    );
    assert!(text.contains("\"orders.*\""), "{text}");
    assert_eq!(router.stats().errors, 2);
}

#[tokio::test]
async fn mirror_publishes_to_every_bus_with_one_id() {
    let (router, md, engine, main) = platform();
    assert_eq!(
        names(&router.route(&topic("mirror.x")).unwrap()),
        ["md", "engine"]
    );
    let mut on_md = md
        .subscribe(pattern("mirror.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let mut on_engine = engine
        .subscribe(pattern("mirror.>"), SubscribeOptions::new())
        .await
        .unwrap();
    let on_main = main
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();

    router.publish(msg("mirror.x", "no id")).await.unwrap();
    let (a, b) = (next(&mut on_md).await, next(&mut on_engine).await);
    assert_eq!(a, b);
    assert!(
        a.headers.id.as_deref().is_some_and(|id| !id.is_empty()),
        "an id was generated"
    );

    router
        .publish(msg("mirror.x", "with id").with_id("m-1"))
        .await
        .unwrap();
    assert_eq!(next(&mut on_md).await.headers.id.as_deref(), Some("m-1"));
    assert_eq!(
        next(&mut on_engine).await.headers.id.as_deref(),
        Some("m-1")
    );
    assert_eq!(on_main.pending(), 0);

    // A mirror bus that fails: the error names it once.
    engine.close().await.unwrap();
    let e = router.publish(msg("mirror.x", "late")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert_eq!(e.to_string().matches("bus \"engine\"").count(), 1, "{e}");
}

#[test]
fn validation_errors_name_the_rule() {
    let build = |f: fn(busway::router::RouterBuilder) -> busway::router::RouterBuilder| {
        f(Router::builder().bus("a", mem("a")).bus("b", mem("b"))).build()
    };
    let unknown = error_text(
        build(|r| r.route("x.>", &["a"]).route("y.>", &["c"])),
        ErrorKind::InvalidConfig,
    );
    assert_eq!(
        unknown,
        "routes[1].to: the rule matching \"y.>\" names unknown bus \"c\"; the buses are: a, b"
    );
    let shadowed = error_text(
        build(|r| {
            r.route("marketdata.>", &["a"])
                .route("x", &["a"])
                .route("marketdata.quotes.*", &["b"])
        }),
        ErrorKind::InvalidConfig,
    );
    assert_eq!(
        shadowed,
        "routes[2]: the rule matching \"marketdata.quotes.*\" is shadowed by routes[0] (match \"marketdata.>\"): every topic it matches is taken by routes[0] first, so it never applies; remove it or move it above routes[0]"
    );
    // A rule equal to an earlier one is shadowed too.
    let same = error_text(
        build(|r| r.route("a.*", &["a"]).route("a.*", &["b"])),
        ErrorKind::InvalidConfig,
    );
    assert!(same.starts_with("routes[1]: "), "{same}");
    assert_eq!(
        error_text(build(|r| r.route("a.>", &[])), ErrorKind::InvalidConfig),
        "routes[0].to: the rule matching \"a.>\" names no bus"
    );
    assert_eq!(
        error_text(
            build(|r| r.route("a.>", &["a", "b", "a"])),
            ErrorKind::InvalidConfig
        ),
        "routes[0].to: the rule matching \"a.>\" names bus \"a\" twice"
    );
    assert_eq!(
        error_text(build(|r| r.route("a.>.b", &["a"])), ErrorKind::InvalidConfig),
        "routes[0].match: invalid pattern \"a.>.b\": '>' is token 2 of 3; it may only be the last token"
    );
    assert_eq!(
        error_text(build(|r| r.default_to(&["zz"])), ErrorKind::InvalidConfig),
        "default.to: the default names unknown bus \"zz\"; the buses are: a, b"
    );
    assert_eq!(
        error_text(Router::builder().build(), ErrorKind::InvalidConfig),
        "a router needs at least one bus"
    );
    assert_eq!(
        error_text(
            Router::builder()
                .bus("a", mem("a"))
                .bus("a", mem("a"))
                .build(),
            ErrorKind::InvalidConfig
        ),
        "bus \"a\" is added twice"
    );
    // Narrower rules first, then wider ones, is the intended order and is fine; so is a bus
    // that no rule uses.
    build(|r| {
        r.route("marketdata.quotes.*", &["b"])
            .route("marketdata.>", &["a"])
    })
    .unwrap();
}

const CONFIG: &str = r#"
[buses.md]
transport = "memory"
[buses.main]
transport = "memory"

[[routes]]
match = "marketdata.>"
to = "md"

[[routes]]
match = "marketdata.quotes.>"
to = "main"
"#;

#[tokio::test]
async fn config_errors_name_the_file() {
    let config = Config::from_toml(CONFIG, "platform.toml").unwrap();
    let expected = "platform.toml: routes[1]: the rule matching \"marketdata.quotes.>\" is shadowed by routes[0] (match \"marketdata.>\"): every topic it matches is taken by routes[0] first, so it never applies; remove it or move it above routes[0]";
    assert_eq!(
        error_text(RoutingTable::from_config(&config), ErrorKind::InvalidConfig),
        expected
    );
    assert_eq!(
        error_text(
            Router::from_config(&config, &Registry::new()).await,
            ErrorKind::InvalidConfig
        ),
        expected
    );
    // Configs built in code get the same checks as parsed ones.
    let mut config = Config::from_toml(CONFIG, "platform.toml").unwrap();
    config.routes[1].to = vec!["nowhere".into()];
    config.routes[1].pattern = pattern("engine.>");
    assert_eq!(
        error_text(RoutingTable::from_config(&config), ErrorKind::InvalidConfig),
        "platform.toml: routes[1].to: the rule matching \"engine.>\" names unknown bus \"nowhere\"; the buses are: main, md"
    );
}

/// Builds `MemoryBus`es and remembers them, so a test can see what happened to them.
#[derive(Debug, Default, Clone)]
struct Recording(Arc<Mutex<Vec<Arc<dyn Bus>>>>);

#[async_trait]
impl TransportFactory for Recording {
    fn kind(&self) -> &'static str {
        "recording"
    }
    fn validate(&self, _ctx: BuildContext<'_>) -> busway::Result<()> {
        Ok(())
    }
    /// A bus with `unreachable = true` fails as an unreachable broker would.
    async fn build(&self, ctx: BuildContext<'_>) -> busway::Result<Arc<dyn Bus>> {
        if ctx.config.options.contains_key("unreachable") {
            return Err(busway::Error::new(
                ErrorKind::Connection,
                format!("bus {:?}: unreachable", ctx.bus),
            ));
        }
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(ctx.bus));
        self.0.lock().unwrap().push(bus.clone());
        Ok(bus)
    }
}

#[tokio::test]
async fn from_config_builds_buses_and_closes_them_on_failure() {
    let recording = Recording::default();
    let mut registry = Registry::new();
    registry.register(recording.clone());
    let good = r#"
        [buses.a]
        transport = "recording"
        [buses.b]
        transport = "recording"
        [[routes]]
        match = "x.>"
        to = ["a", "b"]
        [default]
        to = "b"
    "#;
    let router = Router::from_config(&Config::from_toml(good, "good.toml").unwrap(), &registry)
        .await
        .unwrap();
    let built: Vec<String> = router.buses().into_iter().map(|(n, _)| n).collect();
    assert_eq!(built, ["a", "b"]);
    assert_eq!(names(&router.route(&topic("x.y")).unwrap()), ["a", "b"]);
    assert_eq!(names(&router.route(&topic("z")).unwrap()), ["b"]);

    // Every bus's config is checked before any connection opens: nothing is built.
    let bad = good.replace(
        "[buses.b]\n        transport = \"recording\"",
        "[buses.b]\n        transport = \"carrier-pigeon\"",
    );
    recording.0.lock().unwrap().clear();
    let text = error_text(
        Router::from_config(&Config::from_toml(&bad, "bad.toml").unwrap(), &registry).await,
        ErrorKind::UnknownTransport,
    );
    assert!(
        text.starts_with("bad.toml: buses.b.transport: unknown transport \"carrier-pigeon\""),
        "{text}"
    );
    assert!(recording.0.lock().unwrap().is_empty(), "nothing built");

    // Buses build in name order: `a` is built, then `b` fails; `a` must not stay open.
    let unreachable = good.replace(
        "[buses.b]\n        transport = \"recording\"",
        "[buses.b]\n        transport = \"recording\"\n        unreachable = true",
    );
    error_text(
        Router::from_config(
            &Config::from_toml(&unreachable, "u.toml").unwrap(),
            &registry,
        )
        .await,
        ErrorKind::Connection,
    );
    let built = recording.0.lock().unwrap().clone();
    assert_eq!(built.len(), 1);
    let kind = built[0]
        .publish(msg("x.y", "late"))
        .await
        .unwrap_err()
        .kind();
    assert_eq!(
        kind,
        ErrorKind::Closed,
        "the bus built before the failure was closed"
    );
}

#[tokio::test]
async fn wildcard_subscription_merges_buses_and_filters_by_the_table() {
    let (router, md, engine, main) = platform();
    let mut all = router
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();

    // Published through the router: each arrives once, from the bus it was routed to.
    router
        .publish(msg("marketdata.quotes.AAPL", "q"))
        .await
        .unwrap();
    router.publish(msg("engine.orders", "o")).await.unwrap();
    router.publish(msg("other.thing", "t")).await.unwrap();
    let mut got: Vec<String> = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut all).await.topic.to_string());
    }
    got.sort();
    assert_eq!(
        got,
        ["engine.orders", "marketdata.quotes.AAPL", "other.thing"]
    );

    // Published straight onto a bus the table would not put the topic on: filtered out.
    // Each is followed by a routed sentinel on the same bus; per-bus order means the stray
    // message, had it passed the filter, would arrive before its sentinel.
    md.publish(msg("engine.orders", "stray on md"))
        .await
        .unwrap();
    md.publish(msg("marketdata.end", "sentinel md"))
        .await
        .unwrap();
    main.publish(msg("marketdata.quotes.MSFT", "stray on main"))
        .await
        .unwrap();
    main.publish(msg("other.end", "sentinel main"))
        .await
        .unwrap();
    engine
        .publish(msg("other.thing", "stray on engine"))
        .await
        .unwrap();
    engine
        .publish(msg("engine.end", "sentinel engine"))
        .await
        .unwrap();
    let mut got: Vec<String> = Vec::new();
    for _ in 0..3 {
        let m = next(&mut all).await;
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    got.sort();
    assert_eq!(got, ["sentinel engine", "sentinel main", "sentinel md"]);

    // The merged subscription counts what it delivered, not what it filtered.
    assert_eq!(all.stats().delivered, 6);
}

#[tokio::test]
async fn a_subscription_listens_only_where_matching_topics_can_go() {
    let (router, md, _engine, main) = platform();
    let table = router.table();
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("marketdata.quotes.*"))),
        ["md"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("engine.orders"))),
        ["engine"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("*.orders"))),
        ["md", "engine", "main"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("portfolio.>"))),
        ["main"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("mirror.*"))),
        ["md", "engine"]
    );

    // Through the router: a `marketdata` subscription is not fed by the main bus.
    let mut quotes = router
        .subscribe(pattern("marketdata.quotes.*"), SubscribeOptions::new())
        .await
        .unwrap();
    main.publish(msg("marketdata.quotes.X", "stray"))
        .await
        .unwrap();
    md.publish(msg("marketdata.quotes.Y", "routed"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut quotes).await.topic.as_str(),
        "marketdata.quotes.Y"
    );
}

#[test]
fn buses_for_pattern_skips_rules_already_taken() {
    let router = Router::builder()
        .bus("a", mem("a"))
        .bus("b", mem("b"))
        .bus("c", mem("c"))
        .route("x.*.z", &["a"])
        .route("x.y.>", &["b"])
        .default_to(&["c"])
        .build()
        .unwrap();
    let table = router.table();
    // x.y.z goes to a; the rule x.y.> never sees it; neither does the default.
    assert_eq!(names(&table.buses_for_pattern(&pattern("x.y.z"))), ["a"]);
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("*.y.z"))),
        ["a", "c"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("x.y.*"))),
        ["a", "b"]
    );
    assert_eq!(
        names(&table.buses_for_pattern(&pattern("x.q.*"))),
        ["a", "c"]
    );
    assert!(table.buses_for_pattern(&pattern("w")) == [Arc::from("c")]);
}

#[tokio::test]
async fn options_a_bus_cannot_honour_are_its_unsupported_error() {
    let (router, ..) = platform();
    let text = error_text(
        router
            .subscribe(
                pattern("marketdata.>"),
                SubscribeOptions::new().start(StartFrom::Beginning),
            )
            .await,
        ErrorKind::Unsupported,
    );
    assert!(
        text.starts_with("bus \"md\" (broadcast mode) cannot replay"),
        "{text}"
    );
    error_text(
        router.check_subscribe(
            &pattern("marketdata.>"),
            &SubscribeOptions::new().start(StartFrom::Beginning),
        ),
        ErrorKind::Unsupported,
    );
    router
        .check_subscribe(
            &pattern("marketdata.>"),
            &SubscribeOptions::new().group("g"),
        )
        .unwrap();
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes_on_every_bus() {
    let (router, ..) = platform();
    let opts = || {
        SubscribeOptions::new()
            .capacity(1)
            .overflow(Overflow::DropNewest)
    };
    let sub = router.subscribe(pattern(">"), opts()).await.unwrap();
    // While subscribed, a full queue of capacity 1 drops (and counts) what does not fit.
    for t in ["marketdata.a", "marketdata.b", "engine.a", "engine.b"] {
        router.publish(msg(t, "x")).await.unwrap();
    }
    assert_eq!(router.stats().dropped, 2);
    drop(sub);
    for t in [
        "marketdata.a",
        "marketdata.b",
        "engine.a",
        "engine.b",
        "other",
    ] {
        router.publish(msg(t, "x")).await.unwrap();
    }
    assert_eq!(router.stats().dropped, 2, "no queue left to overflow");

    // A subscription on one bus shows its queue's drops at once, before anything is taken.
    let quotes = router
        .subscribe(pattern("marketdata.>"), opts())
        .await
        .unwrap();
    for t in ["marketdata.a", "marketdata.b", "marketdata.c"] {
        router.publish(msg(t, "x")).await.unwrap();
    }
    assert_eq!(quotes.stats().dropped, 2);
}

#[tokio::test]
async fn close_ends_subscriptions_and_refuses_work() {
    let (router, md, ..) = platform();
    let mut sub = router
        .subscribe(pattern(">"), SubscribeOptions::new())
        .await
        .unwrap();
    router.close().await.unwrap();
    router.close().await.unwrap();
    assert!(
        sub.recv_timeout(WAIT).await.unwrap().is_none(),
        "the subscription ended"
    );
    error_text(
        router.publish(msg("marketdata.a", "x")).await,
        ErrorKind::Closed,
    );
    error_text(
        router
            .subscribe(pattern(">"), SubscribeOptions::new())
            .await,
        ErrorKind::Closed,
    );
    error_text(
        md.publish(msg("marketdata.a", "x")).await,
        ErrorKind::Closed,
    );
}

#[tokio::test]
async fn request_goes_to_the_routed_bus() {
    let (router, _md, engine, _main) = platform();
    let mut server = router
        .subscribe(pattern("engine.rpc.*"), SubscribeOptions::new())
        .await
        .unwrap();
    let responder = tokio::spawn(async move {
        let d = server.recv().await.expect("a request");
        let mut answer = d.message().payload.to_vec();
        answer.reverse();
        d.reply(answer).await.unwrap();
    });
    let reply = router
        .request(msg("engine.rpc.echo", "abc"), WAIT)
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"cba");
    responder.await.unwrap();
    assert!(
        engine.stats().published >= 2,
        "request and reply used the engine bus"
    );
}

#[tokio::test]
async fn a_tiny_cache_still_routes_right() {
    let router = Router::builder()
        .bus("a", mem("a"))
        .bus("b", mem("b"))
        .route("even.>", &["a"])
        .default_to(&["b"])
        .cache_capacity(1)
        .build()
        .unwrap();
    for round in 0..3 {
        for i in 0..200 {
            let (t, want) = if i % 2 == 0 {
                (format!("even.{i}"), "a")
            } else {
                (format!("odd.{i}"), "b")
            };
            assert_eq!(
                names(&router.route(&topic(&t)).unwrap()),
                [want],
                "round {round}, {t}"
            );
        }
    }
}

fn token() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just("c")]
}

fn topic_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 1..5).prop_map(|t| t.join("."))
}

fn pattern_strategy() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop_oneof![token(), Just("*")], 0..4),
        prop::bool::ANY,
    )
        .prop_filter_map("non-empty", |(mut t, rest)| {
            if rest {
                t.push(">");
            }
            (!t.is_empty()).then(|| t.join("."))
        })
}

proptest! {
    /// Whatever the table, a subscription listens on every bus some matching topic is routed
    /// to: `buses_for_pattern` never misses one.
    #[test]
    fn buses_for_pattern_is_never_missing_a_bus(
        rules in prop::collection::vec((pattern_strategy(), 0..3usize), 0..5),
        default in prop::option::of(0..3usize),
        sub in pattern_strategy(),
        topics in prop::collection::vec(topic_strategy(), 1..40),
    ) {
        let bus_names = ["x", "y", "z"];
        let mut builder = Router::builder();
        for n in bus_names {
            builder = builder.bus(n, mem(n));
        }
        for (p, b) in &rules {
            builder = builder.route(p, &[bus_names[*b]]);
        }
        if let Some(d) = default {
            builder = builder.default_to(&[bus_names[d]]);
        }
        let Ok(router) = builder.build() else { return Ok(()) }; // a shadowed rule
        let table = router.table();
        let listening = table.buses_for_pattern(&pattern(&sub));
        for t in topics {
            let t = topic(&t);
            if !pattern(&sub).matches(&t) {
                continue;
            }
            if let Ok(to) = table.lookup(&t) {
                for bus in to {
                    prop_assert!(listening.contains(bus), "{t} goes to {bus} but {sub} listens on {listening:?}");
                }
            }
        }
    }
}

#[test]
fn the_table_prints_one_line_per_rule() {
    let (router, ..) = platform();
    assert_eq!(
        router.table().to_string(),
        "routes[0]  marketdata.>  -> md\n\
         routes[1]  engine.>      -> engine\n\
         routes[2]  mirror.>      -> md, engine\n\
         default                  -> main\n"
    );
}
