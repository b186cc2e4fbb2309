//! Messaging benchmark client (driven by scripts/bench-messaging.sh): latency from publish
//! to `backup.started`, and throughput of a burst of commands, against running workers.
//!
//! Usage: bench_messaging <amqp-url> <latency-samples> <burst-size>

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crm_backup::messaging::command::Command;
use crm_backup::messaging::event;
use crm_backup::model::TargetKind;
use crm_backup::model::{Action, TargetSelector};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: bench_messaging <amqp-url> <samples> <burst>")?;
    let samples: usize = args.get(2).map_or(Ok(100), |s| s.parse())?;
    let burst: usize = args.get(3).map_or(Ok(1000), |s| s.parse())?;
    let common::BenchClient {
        connection: _connection,
        publisher,
        mut events,
    } = common::connect(url).await?;
    let new_command = || {
        Command::new(
            Action::Backup,
            TargetSelector::One(TargetKind::Postgres),
            "bench",
        )
    };

    // Latency: one command at a time on an idle queue.
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let command = new_command();
        let sent = Instant::now();
        publisher
            .command(&command, None, Default::default())
            .await?;
        let mut started = None;
        loop {
            let e = events
                .next(Duration::from_secs(120))
                .await?
                .ok_or("timed out")?;
            if e.command_id != command.id {
                continue;
            }
            if e.event == event::STARTED && started.is_none() {
                started = Some(sent.elapsed());
            }
            if e.event == event::COMPLETED {
                break;
            }
            if e.event == event::FAILED && e.will_retry != Some(true) {
                return Err(format!("command failed: {:?}", e.error).into());
            }
        }
        latencies.push(started.ok_or("no started event")?);
    }
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];

    // Throughput: a burst published back to back, until every command has completed.
    let commands: Vec<Command> = (0..burst).map(|_| new_command()).collect();
    let mut pending: HashSet<String> = commands.iter().map(|c| c.id.clone()).collect();
    let start = Instant::now();
    for command in &commands {
        publisher.command(command, None, Default::default()).await?;
    }
    let published = start.elapsed();
    while !pending.is_empty() {
        let e = events
            .next(Duration::from_secs(300))
            .await?
            .ok_or("timed out in the burst")?;
        if e.event == event::COMPLETED || (e.event == event::FAILED && e.will_retry != Some(true)) {
            pending.remove(&e.command_id);
        }
    }
    let elapsed = start.elapsed();
    println!(
        "latency_p50_ms={:.1} latency_p99_ms={:.1} samples={} burst={} publish_s={:.2} burst_s={:.2} commands_per_s={:.1}",
        percentile(0.50).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        samples,
        burst,
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        burst as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
