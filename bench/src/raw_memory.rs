//! The raw in-process baselines: a crossbeam `bounded(1024)` channel between threads (one
//! subscriber), `tokio::sync::broadcast` (fan-out, publishing with nobody listening, and paced
//! latency to several subscribers) and a tokio `mpsc` channel for paced latency to one
//! (paced by the same tokio timer as busway).
//!
//! Into one subscriber (1 -> 1, 7 -> 1) the fair baselines are channels between tokio tasks
//! on the same runtime as busway's side, publishing through the same loop: tokio `mpsc` and
//! `flume`, both bounded(1024) (see [`in_runtime`]); crossbeam's spinning OS threads stay the
//! `raw` side for comparison with earlier figures.

use busway::{Error, ErrorKind, Result};
use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;

use super::engine::{publish_all, publish_loop, Payloads, Run, SideResult};
use super::{Plan, Shape};

/// Runs one shape on the raw channels.
///
/// # Errors
/// A thread or task of the bench failed.
pub(crate) async fn run(plan: &Plan) -> Result<SideResult> {
    match plan.shape {
        Shape::Pubsub | Shape::Fanin => crossbeam(plan).await,
        Shape::Publish | Shape::Fanout => broadcast(plan).await,
        Shape::Latency if plan.subscribers > 1 => broadcast(plan).await,
        Shape::Latency => mpsc(plan).await,
    }
}

fn join_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Other, format!("a bench thread failed: {e}"))
}

/// The in-runtime baselines of a shape into one subscriber (none for other shapes), each
/// labelled for the report: tokio `mpsc(1024)` and `flume::bounded(1024)`, publisher tasks
/// into a receiver task, publishing through [`publish_loop`] as busway's side does.
///
/// # Errors
/// A task of the bench failed.
pub(crate) async fn in_runtime(plan: &Plan) -> Result<Vec<(String, SideResult)>> {
    if !matches!(plan.shape, Shape::Pubsub | Shape::Fanin) {
        return Ok(Vec::new());
    }
    Ok(vec![
        ("tokio mpsc".to_string(), mpsc(plan).await?),
        ("flume".to_string(), flume_tasks(plan).await?),
    ])
}

/// Publisher tasks -> one receiver task over `flume::bounded(1024)`, async on both ends.
async fn flume_tasks(plan: &Plan) -> Result<SideResult> {
    let mut run = Run::new(plan);
    let (tx, rx) = flume::bounded::<Bytes>(1024);
    let tally = run.tally(0);
    let reader = tokio::spawn(async move {
        while let Ok(b) = rx.recv_async().await {
            tally.record(&b);
        }
    });
    let published = publish_all(&mut run, |share, deadline| {
        let tx = tx.clone();
        let plan = plan.clone();
        async move {
            let tx = &tx;
            publish_loop(&plan, share, deadline, |payload| async move {
                tx.send_async(payload)
                    .await
                    .map_err(|_| Error::closed("the raw flume receiver"))
            })
            .await
        }
    })
    .await?;
    let what = format!(
        "flume::bounded(1024), {} publisher task(s) -> 1 receiver task",
        plan.publishers
    );
    let result = run.finish(what, published).await;
    reader.abort();
    Ok(result)
}

/// Producer threads and one consumer thread on a crossbeam `bounded(1024)` channel.
async fn crossbeam(plan: &Plan) -> Result<SideResult> {
    let mut run = Run::new(plan);
    let (tx, rx) = crossbeam_channel::bounded::<Bytes>(1024);
    let tally = run.tally(0);
    let consumer = std::thread::spawn(move || {
        while let Ok(b) = rx.recv() {
            tally.record(&b);
        }
    });
    let deadline = run.start().map(|d| d.into_std());
    let producers: Vec<_> = run
        .shares()
        .into_iter()
        .map(|share| {
            let tx = tx.clone();
            let payloads = Payloads::new(plan);
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while sent < share {
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        break;
                    }
                    if tx.send(payloads.next()).is_err() {
                        break;
                    }
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    drop(tx);
    let published = tokio::task::spawn_blocking(move || {
        producers
            .into_iter()
            .map(|p| p.join().unwrap_or(0))
            .sum::<u64>()
    })
    .await
    .map_err(join_err)?;
    let what = format!(
        "crossbeam bounded(1024), {} producer thread(s) -> 1 consumer thread",
        plan.publishers
    );
    let result = run.finish(what, published).await;
    // The consumer ends once every sender is gone.
    tokio::task::spawn_blocking(move || consumer.join())
        .await
        .map_err(join_err)?
        .map_err(|_| join_err("the consumer thread panicked"))?;
    Ok(result)
}

/// One tokio broadcast channel, sized so no receiver can lag, with one receiver task per
/// subscriber (none for the publish shape).
async fn broadcast(plan: &Plan) -> Result<SideResult> {
    let mut run = Run::new(plan);
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(plan.queue_capacity());
    let mut readers = Vec::new();
    for i in 0..plan.subscribers {
        let mut rx = tx.subscribe();
        let tally = run.tally(i);
        readers.push(tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(b) => tally.record(&b),
                    Err(RecvError::Lagged(n)) => tally.missed(n),
                    Err(RecvError::Closed) => break,
                }
            }
        }));
    }
    let published = publish_all(&mut run, |share, deadline| {
        let tx = tx.clone();
        let plan = plan.clone();
        async move {
            publish_loop(&plan, share, deadline, |payload| {
                // With nobody subscribed `send` fails by design: the message goes nowhere.
                let _ = tx.send(payload);
                // busway's publish is async; give the baseline the same cooperative yield
                // points, or woken receivers wait behind a publisher that never yields.
                async {
                    tokio::task::consume_budget().await;
                    Ok(())
                }
            })
            .await
        }
    })
    .await?;
    let what = format!(
        "tokio::sync::broadcast({}), {} receiver task(s)",
        plan.queue_capacity(),
        plan.subscribers
    );
    let result = run.finish(what, published).await;
    for r in readers {
        r.abort();
    }
    Ok(result)
}

/// A tokio mpsc channel (1024) between publisher tasks (paced in the latency shape) and a
/// receiver task.
async fn mpsc(plan: &Plan) -> Result<SideResult> {
    let mut run = Run::new(plan);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let tally = run.tally(0);
    let reader = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            tally.record(&b);
        }
    });
    let published = publish_all(&mut run, |share, deadline| {
        let tx = tx.clone();
        let plan = plan.clone();
        async move {
            let tx = &tx;
            publish_loop(&plan, share, deadline, |payload| async move {
                tx.send(payload)
                    .await
                    .map_err(|_| Error::closed("the raw mpsc receiver"))
            })
            .await
        }
    })
    .await?;
    let what = format!(
        "tokio::sync::mpsc(1024), {} {}publisher task(s) -> 1 receiver task",
        plan.publishers,
        if plan.rate.is_some() { "paced " } else { "" }
    );
    let result = run.finish(what, published).await;
    reader.abort();
    Ok(result)
}
