//! Benchmark of the Redis lock, driven by `bench/redis-lock.sh`: uncontended acquire + release
//! pairs per second, and contended handoff latency (from the holder's release call to the next
//! holder's grant).
//!
//! Run with `cargo run --release -p contend-redis --example lock_bench -- --url redis://127.0.0.1:56379/0`.
//! Prints `key=value` lines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contend_redis::{LockClient, LockOptions};

struct Args {
    url: String,
    concurrency: usize,
    ops: usize,
    waiters: usize,
    handoffs: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        url: "redis://127.0.0.1:56379/0".into(),
        concurrency: 50,
        ops: 100_000,
        waiters: 16,
        handoffs: 3_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--url" => args.url = value.clone(),
            "--concurrency" => args.concurrency = number()?.max(1),
            "--ops" => args.ops = number()?.max(1),
            "--waiters" => args.waiters = number()?.max(2),
            "--handoffs" => args.handoffs = number()?.max(1),
            _ => {
                return Err(format!(
                    "unknown flag {flag} (--url --concurrency --ops --waiters --handoffs)"
                ));
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    let ns = format!("bench-{:08x}", rand::random::<u32>());
    let client = LockClient::builder(&args.url)
        .namespace(&ns)
        .connect()
        .await?;
    let options = LockOptions::new()
        .lease(Duration::from_secs(10))
        .wait(Duration::from_secs(30));

    // Uncontended: each task its own key.
    let per_task = args.ops / args.concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("uncontended-{i}");
            for _ in 0..per_task {
                let g = client.acquire(&key, &options).await?;
                g.release().await?;
            }
            Ok::<(), contend::Error>(())
        }))
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let pairs = (per_task * args.concurrency) as f64;
    println!("uncontended_pairs={}", pairs as u64);
    println!(
        "uncontended_pairs_per_sec={:.0}",
        pairs / elapsed.as_secs_f64()
    );

    // Contended handoff: waiters on one key; latency from release call to the next grant.
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let per_waiter = args.handoffs / args.waiters;
    let mut tasks = Vec::new();
    for _ in 0..args.waiters {
        let (client, released_at, latencies) =
            (client.clone(), released_at.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_waiter {
                let g = client.acquire("hot", &options).await?;
                if let Some(at) = released_at.lock().unwrap().take() {
                    latencies.lock().unwrap().push(at.elapsed());
                }
                // A short critical section, so that the others are waiting when it ends.
                tokio::time::sleep(Duration::from_micros(200)).await;
                *released_at.lock().unwrap() = Some(Instant::now());
                g.release().await?;
            }
            Ok::<(), contend::Error>(())
        }))
    }
    for t in tasks {
        t.await??;
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!("handoffs={}", lat.len());
    println!("handoff_p50_ms={:.3}", pct(0.50));
    println!("handoff_p90_ms={:.3}", pct(0.90));
    println!("handoff_p99_ms={:.3}", pct(0.99));
    Ok(())
}
