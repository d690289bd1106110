//! The raw NATS baseline with async-nats: core publish / subscribe on one connection (its
//! subscription capacity raised so the client never drops for a slow reader), and JetStream
//! publish with pipelined acks plus one durable pull consumer per subscriber, acking each
//! message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use busway::transport::redact_url;
use busway::{Error, ErrorKind, Mode, Result};
use bytes::Bytes;
use futures::StreamExt;

use super::broker::Broker;
use super::engine::{client_err, publish_all, publish_loop, Run, SideResult};
use super::Plan;

/// Runs one shape with async-nats.
///
/// # Errors
/// The broker cannot be reached, or a publish failed.
pub(crate) async fn run(plan: &Plan, broker: &Broker) -> Result<SideResult> {
    let url = broker
        .url()
        .ok_or_else(|| Error::new(ErrorKind::Connection, "no NATS URL"))?;
    // Every seed URL of a cluster, as busway's side gets them.
    let seeds: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| client_err(&format!("NATS URL {}", redact_url(url)), e))?;
    let client = async_nats::ConnectOptions::new()
        .name("busway-bench-raw")
        .subscription_capacity(plan.queue_capacity())
        .connect(seeds)
        .await
        .map_err(|e| client_err(&format!("connect to {}", redact_url(url)), e))?;
    let result = match plan.mode {
        Mode::Broadcast => core(plan, broker, &client).await,
        Mode::Stream => stream(plan, broker, &client).await,
    };
    let _ = client.drain().await;
    result
}

async fn core(plan: &Plan, broker: &Broker, client: &async_nats::Client) -> Result<SideResult> {
    let subject = plan.topic("raw");
    let mut run = Run::new(plan);
    let mut readers = Vec::new();
    for i in 0..plan.subscribers {
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| client_err("SUB", e))?;
        let tally = run.tally(i);
        readers.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                tally.record(&m.payload);
            }
        }));
    }
    // The subscriptions must be registered on the server before the first publish.
    client.flush().await.map_err(|e| client_err("flush", e))?;
    let cpu_before = broker.cpu_seconds().await;
    let published = publish_all(&mut run, |share, deadline| {
        let client = client.clone();
        let plan = plan.clone();
        let subject = async_nats::Subject::from(subject.as_str());
        async move {
            let client = &client;
            let subject = &subject;
            publish_loop(&plan, share, deadline, |payload: Bytes| async move {
                client
                    .publish(subject.clone(), payload)
                    .await
                    .map_err(|e| client_err("raw publish", e))
            })
            .await
        }
    })
    .await?;
    // Published means the server has it, as after busway's `flush`: a local flush only
    // writes the buffer out.
    confirm(client).await?;
    let what = format!(
        "async-nats publish on one connection ({} in flight per publisher), {} subscription(s) on it, subscription capacity {}",
        plan.inflight,
        plan.subscribers,
        plan.queue_capacity()
    );
    let result = run
        .finish_with_cpu(what, published, broker, cpu_before, readers)
        .await;
    Ok(result)
}

/// Returns once the server has processed everything sent before: a request to a subject
/// nobody listens on, which the server answers with "no responders" in order.
async fn confirm(client: &async_nats::Client) -> Result<()> {
    use async_nats::client::RequestErrorKind;
    match client.request(client.new_inbox(), Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(client_err("round trip", e)),
    }
}

async fn stream(plan: &Plan, broker: &Broker, client: &async_nats::Client) -> Result<SideResult> {
    let subject = plan.topic("raw");
    let name = format!("BENCHRAW_{}_{}", plan.run_id, plan.shape.as_str());
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            // Like busway's stream, which holds every topic of its bus: the stream covers all
            // of this run's subjects and each consumer filters the one it reads, so the server
            // does the same filtering work for both sides.
            subjects: vec![format!("rawbench.{}.>", plan.run_id)],
            num_replicas: broker.replicas(),
            ..Default::default()
        })
        .await
        .map_err(|e| client_err("create a JetStream stream", e))?;
    let mut run = Run::new(plan);
    let mut readers = Vec::new();
    for i in 0..plan.subscribers {
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("c{i}")),
                filter_subject: subject.clone(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| client_err("create a pull consumer", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| client_err("pull messages", e))?;
        let tally = run.tally(i);
        readers.push(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                // Stream errors (missed heartbeats on a busy machine) are not losses; a
                // missing message shows up in the count.
                let Ok(m) = m else { continue };
                if m.ack().await.is_err() {
                    tally.error();
                }
                tally.record(&m.payload);
            }
        }));
    }
    let cpu_before = broker.cpu_seconds().await;
    // Message ids unique over the run's publishers.
    let ids = std::sync::Arc::new(AtomicU64::new(0));
    let published = publish_all(&mut run, |share, deadline| {
        let js = js.clone();
        let plan = plan.clone();
        let subject = async_nats::Subject::from(subject.as_str());
        let ids = ids.clone();
        let prefix = format!("{}-{}", plan.run_id, plan.shape.as_str());
        async move {
            let ids = &*ids;
            let (js, subject, prefix) = (&js, &subject, &prefix);
            publish_loop(&plan, share, deadline, |payload: Bytes| async move {
                let publish = jetstream::message::PublishMessage::build().payload(payload);
                let publish = if plan.raw_msg_id {
                    let n = ids.fetch_add(1, Ordering::Relaxed);
                    publish.message_id(format!("{prefix}-{n}"))
                } else {
                    publish
                };
                let ack = js
                    .send_publish(subject.clone(), publish)
                    .await
                    .map_err(|e| client_err("raw JetStream publish", e))?;
                ack.await
                    .map(drop)
                    .map_err(|e| client_err("raw JetStream publish ack", e))
            })
            .await
        }
    })
    .await?;
    let what = format!(
        "async-nats JetStream publish{}, {} acks pipelined per publisher, to a stream over all of the run's subjects; per subscriber a durable pull consumer filtered to the subject, each message acked",
        if plan.raw_msg_id { " with a Nats-Msg-Id" } else { "" },
        plan.inflight
    );
    let result = run
        .finish_with_cpu(what, published, broker, cpu_before, readers)
        .await;
    let _ = js.delete_stream(&name).await;
    Ok(result)
}
