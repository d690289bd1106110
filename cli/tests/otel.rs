//! The `otel` feature as a user wires it: `tracing-opentelemetry`'s layer over an
//! OpenTelemetry SDK tracer whose exporter keeps spans in memory. One market-data quote of the
//! seven-engine demo is one OpenTelemetry trace across at least four engines and two buses, on
//! memory and on Redis + NATS, and the `traceparent` headers carry OpenTelemetry's own ids.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use busway_cli::demo::{self, DemoOptions};
use busway_testkit::{nats::NatsServer, redis::RedisServer};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// Runs the demo with `config` (`None`: the in-memory default) under an OpenTelemetry layer
/// and returns the spans the exporter received.
fn demo_spans(config: Option<std::path::PathBuf>) -> Vec<SpanData> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("busway-test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    let options = DemoOptions {
        config,
        duration: Duration::from_millis(500),
        symbols: 2,
        rate: 10.0,
        ..DemoOptions::default()
    };
    {
        let _default = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let report = rt
            .block_on(demo::run(&options, &busway_cli::registry()))
            .expect("the demo runs");
        assert!(report.pass, "{report}");
    }
    provider.force_flush().expect("flushed");
    exporter.get_finished_spans().expect("spans")
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The trace that crosses the most engines holds one root, a market-data publish, at least
/// four engines and two buses; every parent is a span of the trace; every span's recorded
/// `trace_id` and `span_id` (what the headers carried) are OpenTelemetry's.
fn assert_one_trace_follows_a_quote(spans: &[SpanData]) {
    let busway: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name.starts_with("busway."))
        .collect();
    assert!(!busway.is_empty(), "busway's spans reach the exporter");
    for s in &busway {
        let ctx = &s.span_context;
        assert_eq!(
            attr(s, "trace_id"),
            Some(ctx.trace_id().to_string()),
            "{s:?}"
        );
        assert_eq!(attr(s, "span_id"), Some(ctx.span_id().to_string()), "{s:?}");
    }
    let mut handlers: HashMap<_, BTreeSet<String>> = HashMap::new();
    for s in busway.iter().filter(|s| s.name == "busway.handle") {
        handlers
            .entry(s.span_context.trace_id())
            .or_default()
            .extend(attr(s, "handler"));
    }
    let (trace_id, engines) = handlers
        .iter()
        .max_by_key(|(_, e)| e.len())
        .expect("handled spans");
    assert!(
        engines.len() >= 4,
        "the longest trace crosses {engines:?} only"
    );
    let trace: Vec<&&SpanData> = busway
        .iter()
        .filter(|s| s.span_context.trace_id() == *trace_id)
        .collect();
    let buses: BTreeSet<String> = trace
        .iter()
        .filter(|s| s.name == "busway.publish")
        .filter_map(|s| attr(s, "bus"))
        .collect();
    assert!(
        buses.len() >= 2,
        "the trace crosses the buses {buses:?} only"
    );
    let roots: Vec<_> = trace
        .iter()
        .filter(|s| s.parent_span_id == SpanId::INVALID)
        .collect();
    assert_eq!(roots.len(), 1, "one root: {roots:?}");
    assert_eq!(roots[0].name, "busway.publish");
    let topic = attr(roots[0], "topic").unwrap_or_default();
    assert!(
        topic.starts_with("marketdata."),
        "started by a quote: {topic}"
    );
    let ids: HashSet<SpanId> = trace.iter().map(|s| s.span_context.span_id()).collect();
    assert_eq!(ids.len(), trace.len(), "span ids are unique");
    for s in &trace {
        assert!(
            s.parent_span_id == SpanId::INVALID || ids.contains(&s.parent_span_id),
            "{} has its parent in the trace",
            s.name
        );
    }
}

#[test]
fn one_quote_is_one_opentelemetry_trace_in_memory() {
    assert_one_trace_follows_a_quote(&demo_spans(None));
}

#[test]
fn one_quote_is_one_opentelemetry_trace_across_redis_and_nats() {
    let test = "one_quote_is_one_opentelemetry_trace_across_redis_and_nats";
    let Some(redis) = RedisServer::start(test) else {
        return;
    };
    let Some(nats) = NatsServer::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[app]
name = "otel-demo"

[buses.marketdata]
transport = "redis"
url = "{redis}"

[buses.engine]
transport = "nats"
url = "{nats}"

[buses.main]
transport = "memory"

[[routes]]
match = "marketdata.>"
to = "marketdata"

[[routes]]
match = "engine.>"
to = "engine"

[default]
to = "main"
"#,
            redis = redis.url(),
            nats = nats.url(),
        ),
    )
    .unwrap();
    let spans = demo_spans(Some(config));
    assert_one_trace_follows_a_quote(&spans);
    let buses: BTreeSet<String> = spans.iter().filter_map(|s| attr(s, "bus")).collect();
    assert!(
        buses.contains("marketdata") && buses.contains("engine"),
        "publishes on the Redis and the NATS bus: {buses:?}"
    );
}
