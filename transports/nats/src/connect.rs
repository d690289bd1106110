//! Connecting a bus's one async-nats client: its name, credentials (keys and URL userinfo),
//! TLS, buffers and timeouts, and the client's events feeding the bus's counters.

use std::sync::Arc;

use async_nats::{ConnectErrorKind, ConnectOptions};
use busway::transport::Counters;
use busway::{Error, ErrorKind, Result};

use crate::config::{NatsConfig, Servers};
use crate::drops::ClientDrops;

/// Connects `config`'s client to `servers` (from [`NatsConfig::check`]).
///
/// # Errors
/// [`ErrorKind::Auth`] when the server refuses the credentials (at once, without retrying);
/// [`ErrorKind::Connection`] when no server answers within `connect_timeout`;
/// [`ErrorKind::InvalidConfig`] when the credentials file cannot be read.
pub(crate) async fn client(
    config: &NatsConfig,
    servers: Servers,
    counters: &Arc<Counters>,
    drops: &Arc<ClientDrops>,
) -> Result<async_nats::Client> {
    let o = &config.options;
    let mut options = ConnectOptions::new()
        .name(config.client_name())
        .subscription_capacity(o.client_capacity(config.queue.capacity))
        .client_capacity(o.publish_buffer())
        // Every subject busway sends is a validated `Topic` (no whitespace, wildcards or
        // empty tokens): async-nats need not scan it again on every publish.
        .skip_subject_validation(true)
        .connection_timeout(o.connect_timeout())
        // A frozen server keeps its socket open: only unanswered PINGs tell, so the interval
        // bounds how long the bus stays on it before async-nats moves to another server.
        .ping_interval(o.ping_interval())
        .max_reconnects(o.max_reconnects)
        .require_tls(o.tls_required);
    {
        let counters = counters.clone();
        let drops = drops.clone();
        let bus = config.bus.clone();
        options = options.event_callback(move |event| {
            handle_event(&bus, &counters, &drops, event);
            async {}
        });
    }
    // Credentials go through the connect options, which async-nats masks in its logs; keys
    // in config win over the URL's.
    match (&o.user, &o.password) {
        (Some(u), Some(p)) => options = options.user_and_password(u.clone(), p.clone()),
        _ => {
            if let Some((u, p)) = servers.user_pass {
                options = options.user_and_password(u, p);
            }
        }
    }
    if let Some(token) = o.token.clone().or(servers.token) {
        options = options.token(token);
    }
    if let Some(seed) = &o.nkey {
        options = options.nkey(seed.clone());
    }
    if let Some(creds) = &o.creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            Error::config(format!(
                "bus {:?}: creds: cannot read the credentials file: {e}",
                config.bus
            ))
        })?;
    }
    if let Some(ca) = &o.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&o.tls_cert, &o.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    // Servers the cluster advertises are followed (neither `ignore_discovered_servers` nor
    // `retain_servers_order` is set): a bus given one seed URL of a cluster still fails over
    // to the other nodes, and buses spread over the seeds at random.
    // retry_on_initial_connect stays off: a wrong password or an absent server is an error
    // at build, not a background retry loop.
    options
        .connect(servers.addrs)
        .await
        .map_err(|e| connect_error(&config.bus, &config.redacted_url(), e))
}

/// Maps a connect failure to a busway error naming the bus and the redacted URL.
fn connect_error(bus: &str, url: &str, e: async_nats::ConnectError) -> Error {
    let kind = match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            ErrorKind::Auth
        }
        ConnectErrorKind::ServerParse => ErrorKind::InvalidConfig,
        _ => ErrorKind::Connection,
    };
    let hint = match kind {
        ErrorKind::Auth => {
            " (the server refused the credentials: check user/password, token, creds or nkey)"
        }
        _ => "",
    };
    // The error's own text never holds the credentials (async-nats prints kinds only).
    Error::new(
        kind,
        format!("bus {bus:?}: cannot connect to NATS at {url}: {e}{hint}"),
    )
}

fn handle_event(bus: &str, counters: &Counters, drops: &ClientDrops, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            tracing::info!(bus, "connected to NATS");
        }
        Event::Disconnected => {
            // The bus never asks for this (closing drains, which ends in `Closed`), so every
            // loss is a failure. async-nats's event carries no reason: it logs it at debug
            // (target `async_nats`, "disconnected"). One cause is in-band and not the
            // server's: a message async-nats cannot parse (a foreign publisher's malformed
            // header block) makes it drop the connection, and what the server had already
            // sent behind it is lost (see RELIABILITY.md, "Hostile and careless peers").
            Counters::incr(&counters.errors);
            tracing::warn!(
                bus,
                "NATS connection lost (server gone, PINGs unanswered, or a message the client \
                 could not parse, e.g. a malformed header block from another publisher); core \
                 NATS messages in flight are lost, JetStream redelivers after the ack wait; \
                 async-nats reconnects and resubscribes"
            );
        }
        Event::SlowConsumer(sid) => {
            // async-nats dropped a message because a subscription's channel was full. A lower
            // bound: `stats()` reports the exact count once it settles (see `drops`).
            drops.slow_consumer_event();
            tracing::debug!(bus, sid, "slow consumer: async-nats dropped a message");
        }
        Event::ServerError(e) => {
            Counters::incr(&counters.errors);
            tracing::warn!(bus, error = %e, "NATS server error");
        }
        Event::ClientError(e) => {
            Counters::incr(&counters.errors);
            tracing::warn!(bus, error = %e, "NATS client error");
        }
        other => tracing::info!(bus, event = %other, "NATS event"),
    }
}
