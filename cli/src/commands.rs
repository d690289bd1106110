//! `busway check`, `route`, `pub` and `tail`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use busway::transport::redact_url;
use busway::{
    router::RoutingTable, Bus, Config, Error, ErrorKind, Message, Pattern, Registry, Result,
    Router, SubscribeOptions, Topic,
};

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::text::{escape_payload, table};

/// The signals that stop a long-running command: Ctrl-C (SIGINT) and SIGTERM (what service
/// managers send). Installed once for the whole run, so a signal that lands between two waits
/// is seen at the next one (a `ctrl_c()` future made per wait would miss it).
#[derive(Debug)]
pub(crate) struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Waits for SIGINT or SIGTERM; `None` if the handlers are gone.
    pub(crate) async fn recv(&mut self) -> Option<()> {
        tokio::select! {
            r = self.interrupt.recv() => r,
            r = self.terminate.recv() => r,
        }
    }
}

/// Waits for SIGINT or SIGTERM.
///
/// # Errors
/// When a handler cannot be installed.
pub async fn wait_for_stop() -> Result<()> {
    ctrl_c_handler()?.recv().await;
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers a command keeps for its whole run.
///
/// # Errors
/// When a handler cannot be installed.
pub(crate) fn ctrl_c_handler() -> Result<StopSignals> {
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot install the {name} handler"),
            )
            .with_source(e)
        })
    };
    Ok(StopSignals {
        interrupt: install(SignalKind::interrupt(), "Ctrl-C (SIGINT)")?,
        terminate: install(SignalKind::terminate(), "SIGTERM")?,
    })
}

/// `busway check FILE`: loads the config (file and `BUSWAY_*` environment), builds the
/// routing table and checks every bus with its transport's own validation
/// ([`Registry::validate`]), without connecting to any broker: a config `check` accepts is
/// one every other command accepts, up to reaching the brokers.
/// Returns the report: the buses (URLs redacted) and the routing table.
///
/// # Errors
/// The first problem found, naming the file, the key and the reason.
pub fn check(path: &Path, registry: &Registry) -> Result<String> {
    let config = Config::load(path)?;
    RoutingTable::from_config(&config)?;
    registry.validate(&config)?;

    let mut out = format!("config {} (app {:?})\n\nbuses\n", config.source, config.app);
    let rows: Vec<Vec<String>> = config
        .buses
        .iter()
        .map(|(name, bus)| {
            let q = bus.queue_defaults();
            vec![
                name.clone(),
                bus.transport.clone(),
                bus.mode.to_string(),
                bus.url.as_deref().map_or("-".to_string(), redact_url),
                q.overflow.to_string(),
                q.capacity.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["bus", "transport", "mode", "url", "overflow", "capacity"],
        &rows,
    ));
    out.push_str("\nroutes (first match wins)\n");
    let mut rows: Vec<Vec<String>> = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                (i + 1).to_string(),
                r.pattern.as_str().to_string(),
                r.to.join(", "),
            ]
        })
        .collect();
    rows.push(vec![
        String::new(),
        "(default)".to_string(),
        match &config.default {
            Some(to) => to.join(", "),
            None => "none: unrouted topics fail with no_route".to_string(),
        },
    ]);
    out.push_str(&table(&["#", "match", "to"], &rows));
    out.push_str(&format!(
        "\nok: {} buses, {} routes, default {}\n",
        config.buses.len(),
        config.routes.len(),
        config
            .default
            .as_ref()
            .map_or("none".to_string(), |d| d.join(", "))
    ));
    Ok(out)
}

/// `busway route FILE TOPIC`: the line `TOPIC -> BUS[, BUS]  (the rule that decided)`.
///
/// # Errors
/// A bad config or topic, or [`ErrorKind::NoRoute`] when no rule and no default takes it.
pub fn route(path: &Path, topic: &str) -> Result<String> {
    let config = Config::load(path)?;
    let table = RoutingTable::from_config(&config)?;
    let topic = Topic::new(topic)?;
    let buses: Vec<&str> = table.lookup(&topic)?.iter().map(|b| &**b).collect();
    let why = config
        .routes
        .iter()
        .position(|r| r.pattern.matches(&topic))
        .map_or("default".to_string(), |i| {
            format!("routes[{i}] match {:?}", config.routes[i].pattern.as_str())
        });
    Ok(format!("{topic} -> {}  ({why})\n", buses.join(", ")))
}

/// Applies one `--header key=value`: the well-known keys (`id`, `content_type`,
/// `correlation_id`, `reply_to`, `source`) set their header, any other key is a free header.
fn apply_header(message: &mut Message, key: &str, value: &str) -> Result<()> {
    let h = &mut message.headers;
    match key {
        "id" => h.id = Some(value.to_string()),
        "content_type" | "content-type" => h.content_type = Some(value.to_string()),
        "correlation_id" => h.correlation_id = Some(value.to_string()),
        "reply_to" => h.reply_to = Some(Topic::new(value)?),
        "source" => h.source = Some(value.to_string()),
        _ => h.insert(key, value),
    }
    Ok(())
}

/// A message as `pub` and `request` send it: an id, a timestamp, the app as source, then the
/// headers given on the command line.
fn outgoing(
    config: &Config,
    topic: &Topic,
    payload: &[u8],
    headers: &[(String, String)],
) -> Result<Message> {
    let mut message = Message::new(topic.clone(), payload.to_vec())
        .with_id(busway::transport::new_message_id())
        .stamped();
    message.headers.source = Some(config.app.clone());
    for (k, v) in headers {
        apply_header(&mut message, k, v)?;
    }
    Ok(message)
}

/// `busway request TOPIC PAYLOAD --config FILE`: publishes a request through the router (on
/// the bus the topic goes to, with that bus's request mechanism) and returns the first
/// reply.
///
/// # Errors
/// As [`publish`]; [`ErrorKind::Timeout`] when no reply came within `timeout`,
/// [`ErrorKind::NoResponders`] where the transport can tell nobody listens,
/// [`ErrorKind::Unsupported`] on a bus without request/reply.
pub async fn request(
    config_path: &Path,
    topic: &str,
    payload: &[u8],
    headers: &[(String, String)],
    timeout: Duration,
    registry: &Registry,
) -> Result<Message> {
    let config = Config::load(config_path)?;
    let topic = Topic::new(topic)?;
    let message = outgoing(&config, &topic, payload, headers)?;
    let router = Router::from_config(&config, registry).await?;
    let reply = router.request(message, timeout).await;
    let closed = router.close().await;
    let reply = reply?;
    closed?;
    Ok(reply)
}

/// What `busway reply` answers each request with.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The same payload every time.
    Fixed(Vec<u8>),
    /// The request's own payload.
    Echo,
}

/// `busway reply PATTERN --config FILE`: answers every request (a message with `reply_to`)
/// on `pattern` with `answer`, until `count` requests were answered or Ctrl-C / SIGTERM.
/// Prints each request on stderr as `tail` would (`options.format`). Messages
/// without `reply_to` are skipped with a line on stderr. Returns the number answered.
///
/// # Errors
/// A bad config or pattern, a bus that cannot be built, a refused subscription, a reply that
/// cannot be published.
pub async fn reply(
    config_path: &Path,
    pattern: &str,
    answer: Answer,
    options: &TailOptions,
    registry: &Registry,
) -> Result<u64> {
    let config = Config::load(config_path)?;
    let pattern = Pattern::new(pattern)?;
    let router = Router::from_config(&config, registry).await?;
    let result = async {
        let mut stop = ctrl_c_handler()?;
        let mut subscribe = SubscribeOptions::new();
        if let Some(group) = &options.group {
            subscribe = subscribe.group(group.clone());
        }
        let mut sub = router.subscribe(pattern.clone(), subscribe).await?;
        eprintln!("busway: replying on {pattern} (config {})", config.source);
        let mut answered = 0u64;
        while options.count.is_none_or(|n| answered < n) {
            let next = tokio::select! {
                d = sub.recv() => d,
                _ = stop.recv() => break,
            };
            let Some(request) = next else { break };
            if request.message().headers.reply_to.is_none() {
                eprintln!(
                    "busway: skipped a message on {} without reply_to",
                    request.message().topic
                );
                request.ack().await?;
                continue;
            }
            eprint!("{}", format_delivery(&request, options.format));
            let payload = match &answer {
                Answer::Fixed(p) => p.clone(),
                Answer::Echo => request.message().payload.to_vec(),
            };
            request.reply(payload).await?;
            request.ack().await?;
            answered += 1;
        }
        Ok(answered)
    }
    .await;
    let closed = router.close().await;
    let answered = result?;
    closed?;
    Ok(answered)
}

/// `busway pub TOPIC PAYLOAD --config FILE`: builds the router, publishes one stamped
/// message, flushes and closes. Returns a line saying where it went.
///
/// # Errors
/// A bad config, topic or header; a bus that cannot be built; or the publish error
/// ([`ErrorKind::NoRoute`] included).
pub async fn publish(
    config_path: &Path,
    topic: &str,
    payload: &[u8],
    headers: &[(String, String)],
    registry: &Registry,
) -> Result<String> {
    let config = Config::load(config_path)?;
    let topic = Topic::new(topic)?;
    let message = outgoing(&config, &topic, payload, headers)?;
    let router = Router::from_config(&config, registry).await?;
    let result = async {
        let buses: Vec<String> = router
            .route(&topic)?
            .iter()
            .map(|b| b.to_string())
            .collect();
        router.publish(message).await?;
        router.flush().await?;
        Ok(format!(
            "published {topic} ({} bytes) to {}\n",
            payload.len(),
            buses.join(", ")
        ))
    }
    .await;
    let closed = router.close().await;
    let report = result?;
    closed?;
    Ok(report)
}

/// Reloads `router` from the config file at `path` (with the `BUSWAY_*` environment) each
/// time the process gets SIGHUP ([`Router::reload`]: open subscriptions move to the new
/// buses, nothing in flight is lost), saying on stderr what changed; a config that fails
/// keeps the old one, with the error on stderr. Runs until the returned task is aborted.
///
/// # Errors
/// [`ErrorKind::Other`] when the signal handler cannot be installed.
pub fn reload_on_hangup(
    router: Arc<Router>,
    path: PathBuf,
    registry: Registry,
) -> Result<tokio::task::JoinHandle<()>> {
    // Installed before returning: SIGHUP's default action would end the process.
    let mut hangups = signal(SignalKind::hangup()).map_err(|e| {
        Error::new(ErrorKind::Other, "cannot install the SIGHUP handler").with_source(e)
    })?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let outcome = match Config::load(&path) {
                Ok(config) => router.reload(&config, &registry).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(report) => eprintln!("busway: reloaded {}: {report}", path.display()),
                Err(e) => eprintln!(
                    "busway: reload of {} failed, keeping the running config: {e}",
                    path.display()
                ),
            }
        }
    }))
}

/// How `busway tail` prints a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TailFormat {
    /// `topic payload`, one line per message (see [`escape_payload`]).
    #[default]
    Line,
    /// `topic payload`, then one indented `key: value` line per header.
    Headers,
    /// One JSON object per line: `topic`, `payload` (UTF-8) or `payload_escaped`, `headers`,
    /// `attempt`.
    Json,
}

/// What `busway tail` subscribes with, prints and when it stops.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop after this long, whatever arrived.
    pub timeout: Option<Duration>,
    /// At exit, print the subscription's counters and each bus's on stderr.
    pub stats: bool,
    /// Subscribe as a member of this consumer group (competing consumers).
    pub group: Option<String>,
    /// How each message is printed.
    pub format: TailFormat,
}

/// One message as `busway tail` prints it, newline included.
pub fn format_delivery(d: &busway::Delivery, format: TailFormat) -> String {
    let m = d.message();
    match format {
        TailFormat::Line => format!("{} {}\n", m.topic, escape_payload(&m.payload)),
        TailFormat::Headers => {
            let mut out = format!("{} {}\n", m.topic, escape_payload(&m.payload));
            let h = &m.headers;
            let fixed = [
                ("id", h.id.clone()),
                ("timestamp_us", h.timestamp_us.map(|t| t.to_string())),
                ("source", h.source.clone()),
                ("content_type", h.content_type.clone()),
                ("reply_to", h.reply_to.as_ref().map(|t| t.to_string())),
                ("correlation_id", h.correlation_id.clone()),
            ];
            let fixed = fixed
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?)));
            for (k, v) in fixed.chain(h.extra.iter().cloned()) {
                out.push_str(&format!(
                    "  {}: {}\n",
                    escape_payload(k.as_bytes()),
                    escape_payload(v.as_bytes())
                ));
            }
            out
        }
        TailFormat::Json => {
            let mut o = serde_json::json!({
                "topic": m.topic.as_str(),
                "headers": &m.headers,
                "attempt": d.attempt(),
            });
            match std::str::from_utf8(&m.payload) {
                Ok(text) => o["payload"] = text.into(),
                Err(_) => o["payload_escaped"] = escape_payload(&m.payload).into(),
            }
            format!("{o}\n")
        }
    }
}

/// `busway tail PATTERN --config FILE`: subscribes through the router and writes one line
/// per message, `topic payload` (see [`escape_payload`]), until `limits` or Ctrl-C stop it.
/// Says on stderr when the subscription is live. SIGHUP reloads the config file
/// ([`reload_on_hangup`]). Returns the number of messages written.
///
/// # Errors
/// A bad config or pattern, a bus that cannot be built, a refused subscription.
pub async fn tail(
    config_path: &Path,
    pattern: &str,
    limits: TailOptions,
    registry: &Registry,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<u64> {
    use tokio::io::AsyncWriteExt;
    let config = Config::load(config_path)?;
    let pattern = Pattern::new(pattern)?;
    let router = Arc::new(Router::from_config(&config, registry).await?);
    let reloader = reload_on_hangup(router.clone(), config_path.to_path_buf(), registry.clone());
    let result = async {
        let _stop_reloading = AbortOnDrop(reloader?);
        // A Ctrl-C that lands while a line is written or acked is seen at the next wait.
        let mut interrupt = ctrl_c_handler()?;
        let mut options = SubscribeOptions::new();
        if let Some(group) = &limits.group {
            options = options.group(group.clone());
        }
        let mut sub = router.subscribe(pattern.clone(), options).await?;
        eprintln!("busway: tailing {pattern} (config {})", config.source);
        let deadline = limits.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut seen = 0u64;
        if limits.count == Some(0) {
            return Ok(0);
        }
        loop {
            let next = tokio::select! {
                d = sub.recv() => d,
                _ = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => break,
                _ = interrupt.recv() => break,
            };
            let Some(delivery) = next else { break };
            let line = format_delivery(&delivery, limits.format);
            // A reader that stops reading (a full pipe) must not keep Ctrl-C from stopping us.
            let written = tokio::select! {
                r = async {
                    out.write_all(line.as_bytes()).await?;
                    out.flush().await
                } => r,
                _ = interrupt.recv() => break,
            };
            match written {
                Ok(()) => {}
                // `busway tail ... | head` closing the pipe is a normal way to stop.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) => {
                    return Err(
                        Error::new(ErrorKind::Other, "cannot write to stdout").with_source(e)
                    )
                }
            }
            delivery.ack().await?;
            seen += 1;
            if limits.count.is_some_and(|n| seen >= n) {
                break;
            }
        }
        if limits.stats {
            eprintln!("busway: subscription {pattern}: {}", sub.stats());
            for (name, stats) in router.bus_stats() {
                eprintln!("busway: bus {name}: {stats}");
            }
        }
        Ok(seen)
    }
    .await;
    let closed = router.close().await;
    let seen = result?;
    closed?;
    Ok(seen)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
