//! The busway side: a bus built through the [`Registry`](busway::Registry) from a
//! [`BusConfig`], the code path users get, with block-on-full subscription queues large
//! enough that nothing is dropped.

use std::sync::Arc;

use busway::{
    config::BusConfig, transport::BuildContext, Bus, Delivery, Message, Mode, Overflow, Pattern,
    Result, Router, SubscribeOptions, Topic,
};

use super::broker::Broker;
use super::engine::{publish_all, publish_loop, Run, SideResult};
use super::Plan;

/// Builds the bus the plan measures.
///
/// # Errors
/// Whatever the transport's factory returns (bad config, unreachable broker).
pub(crate) async fn build_bus(plan: &Plan, broker: &Broker) -> Result<Arc<dyn Bus>> {
    let mut config = BusConfig::new(plan.transport.as_str());
    config.mode = plan.mode;
    config.url = broker.url().map(str::to_string);
    config.capacity = Some(plan.queue_capacity());
    config.overflow = Some(Overflow::Block);
    if broker.replicas() > 1 && plan.mode == Mode::Stream {
        config
            .options
            .insert("replicas".into(), (broker.replicas() as i64).into());
    }
    if plan.min_replicas > 0 && plan.mode == Mode::Stream {
        config
            .options
            .insert("min_replicas".into(), i64::from(plan.min_replicas).into());
    }
    busway_cli::registry()
        .build_context(BuildContext {
            app: "bench",
            bus: "bench",
            config: &config,
            source: "busway bench",
        })
        .await
}

/// Runs one shape through busway.
///
/// # Errors
/// Building the bus, subscribing or publishing failed.
pub(crate) async fn run(plan: &Plan, broker: &Broker) -> Result<SideResult> {
    let bus = build_bus(plan, broker).await?;
    let bus: Arc<dyn Bus> = if plan.router {
        Arc::new(
            Router::builder()
                .bus("bench", bus)
                .default_to(&["bench"])
                .build()?,
        )
    } else {
        bus
    };
    let topic_name = plan.topic("");
    let topic = Topic::new(&topic_name)?;
    let mut run = Run::new(plan);
    let mut readers = Vec::new();
    let ack = plan.mode == Mode::Stream;
    for i in 0..plan.subscribers {
        let mut options = SubscribeOptions::new()
            .capacity(plan.queue_capacity())
            .overflow(Overflow::Block);
        if ack {
            // A consumer group per subscriber, as the raw side reads: the broker keeps each
            // subscriber's pending entries and takes its acks.
            options = options.group(format!("bench-{i}"));
        }
        let mut sub = bus.subscribe(Pattern::exact(&topic), options).await?;
        let tally = run.tally(i);
        readers.push(tokio::spawn(async move {
            if !ack {
                // Broadcast: one delivery at a time, as the raw side reads its subscriber.
                while let Some(d) = sub.recv().await {
                    tally.record(&d.message().payload);
                }
                return;
            }
            // Take what is queued (up to the raw side's read count of 256) and ack it as one
            // batch: the way a stream consumer keeps up, and what the raw baseline does with
            // one XACK per read.
            let mut batch = Vec::with_capacity(256);
            while sub.recv_many(&mut batch, 256).await > 0 {
                if Delivery::ack_all(&batch).await.is_err() {
                    tally.error();
                }
                for d in batch.drain(..) {
                    tally.record(&d.message().payload);
                }
            }
        }));
    }
    let cpu_before = broker.cpu_seconds().await;
    let published = publish_all(&mut run, |share, deadline| {
        let bus = bus.clone();
        let plan = plan.clone();
        // One topic value per publisher, as separate engines would hold.
        let topic = Topic::new(&topic_name);
        async move {
            let topic = topic?;
            let bus: &dyn Bus = &*bus;
            publish_loop(&plan, share, deadline, |payload| {
                bus.publish(Message::new(topic.clone(), payload))
            })
            .await
        }
    })
    .await?;
    bus.flush().await?;
    let what = format!(
        "busway {} bus ({} mode) built by Registry{}; {} subscription(s), queue {} block{}; {} publish(es) in flight per publisher",
        plan.transport.as_str(),
        plan.mode,
        match (plan.router, busway::metrics::enabled()) {
            (true, true) => ", through a Router, metrics recorded",
            (true, false) => ", through a Router",
            _ => "",
        },
        plan.subscribers,
        plan.queue_capacity(),
        if ack { ", a consumer group each, each delivery acked (what is queued, up to 256, acked as one batch with Delivery::ack_all)" } else { "" },
        plan.inflight
    );
    let mut result = run.finish(what, published).await;
    let cpu_after = broker.cpu_seconds().await;
    result.broker_cpu_s = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
    result.bus_dropped = Some(bus.stats().dropped);
    for r in readers {
        r.abort();
    }
    bus.close().await?;
    Ok(result)
}
