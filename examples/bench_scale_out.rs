//! Scale-out benchmark client (driven by scripts/bench-scale-out.sh): publishes a mixed load
//! of backup commands spread over several targets at once and follows every event until each
//! command has ended. Prints, as `key=value`: the throughput, publish → `backup.started`
//! p50/p99 under that load, the most steps ever running at once for one target (from the
//! started and final events), the target whose steps ran longest in all (seconds during which
//! one of its steps was running: with one step per target at a time, no number of workers
//! finishes sooner), and the commands that failed.
//!
//! Usage: bench_scale_out <amqp-url> <commands> <target,target,…>

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crm_backup::messaging::command::Command;
use crm_backup::messaging::event;
use crm_backup::model::{Action, TargetKind, TargetSelector};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_scale_out <amqp-url> <commands> <target,target,…>";
    let url = args.get(1).ok_or(usage)?;
    let count: usize = args.get(2).ok_or(usage)?.parse()?;
    let targets: Vec<TargetKind> = args
        .get(3)
        .ok_or(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let common::BenchClient {
        connection: _connection,
        publisher,
        mut events,
    } = common::connect(url).await?;

    let commands: Vec<Command> = (0..count)
        .map(|i| {
            let target = targets[i % targets.len()];
            Command::new(Action::Backup, TargetSelector::One(target), "bench")
        })
        .collect();
    let target_of: HashMap<String, TargetKind> = commands
        .iter()
        .map(|c| match c.target {
            TargetSelector::One(target) => (c.id.clone(), target),
            TargetSelector::All => unreachable!("one target per command"),
        })
        .collect();
    let mut pending: HashSet<String> = commands.iter().map(|c| c.id.clone()).collect();
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let start = Instant::now();
    for command in &commands {
        sent_at.insert(command.id.clone(), Instant::now());
        publisher.command(command, None, Default::default()).await?;
    }

    let mut latencies = Vec::with_capacity(count);
    let mut running: HashMap<TargetKind, HashSet<String>> = HashMap::new();
    let mut most_at_once = 0;
    let mut busy: HashMap<TargetKind, (Duration, Option<Instant>)> = HashMap::new();
    let mut failed = 0;
    while !pending.is_empty() {
        let e = events
            .next(Duration::from_secs(600))
            .await?
            .ok_or("timed out")?;
        let Some(target) = target_of.get(&e.command_id) else {
            continue;
        };
        let running = running.entry(*target).or_default();
        if e.event == event::STARTED {
            if let Some(sent) = sent_at.remove(&e.command_id) {
                latencies.push(sent.elapsed());
            }
            if running.is_empty() {
                busy.entry(*target).or_default().1 = Some(Instant::now());
            }
            running.insert(e.command_id.clone());
            most_at_once = most_at_once.max(running.len());
        } else {
            if running.remove(&e.command_id) && running.is_empty() {
                let (total, since) = busy.entry(*target).or_default();
                *total += since.take().map_or(Duration::ZERO, |since| since.elapsed());
            }
            let final_event = e.event == event::COMPLETED || e.will_retry != Some(true);
            if final_event && pending.remove(&e.command_id) && e.event != event::COMPLETED {
                failed += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    let (busiest, (busiest_s, _)) = busy
        .iter()
        .max_by_key(|(_, (total, _))| *total)
        .ok_or("no step started")?;
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "commands={count} seconds={:.2} commands_per_s={:.2} started_p50_s={:.2} started_p99_s={:.2} most_at_once_per_target={most_at_once} busiest_target={busiest} busiest_busy_s={:.2} failed={failed}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        percentile(0.50).as_secs_f64(),
        percentile(0.99).as_secs_f64(),
        busiest_s.as_secs_f64(),
    );
    Ok(())
}
