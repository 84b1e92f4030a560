//! Allocator throughput and latency: durable Allocate+Release over gRPC on
//! loopback, at concurrency 1, 16, 64 and 256.
//!
//! Starts the real `vipam-allocator` binary on a fresh data directory with the
//! pool `default=10.0.0.0/8`. For each concurrency N it opens min(N, 8)
//! HTTP/2 connections and runs N loops spread over them, each allocating an
//! address for a new owner (with three labels, as a Service's) and releasing
//! it again, for a fixed time; every reply is durable (group commit). It
//! reports allocations/s, calls/s, p50 and p99 of each call, writes made
//! durable per flush and the allocator's CPU time per call.
//!
//! Baselines, measured in the same run: an empty gRPC call
//! (`grpc.health.v1.Health/Check`) to the same server over the same
//! connections at the same concurrency (the transport's limit), and a raw
//! sled insert followed by a flush, one thread, in this process on a
//! temporary directory of the same disk (the disk's limit).

mod common;

use std::time::{Duration, Instant};

use common::{
    CACHE_BYTES, Latencies, Server, Table, channels, cpu_time, machine, ms, per_sec, ratio,
    run_allocate_release, run_empty, runtime, temp_dir, verdict, writes_and_flushes,
};

/// Concurrency levels measured.
const CONCURRENCY: [usize; 4] = [1, 16, 64, 256];
/// Time of one measurement.
const MEASURE: Duration = Duration::from_secs(3);
/// Time of the warm-up before each measurement.
const WARM_UP: Duration = Duration::from_millis(300);
/// Most HTTP/2 connections the clients use.
const MAX_CONNECTIONS: usize = 8;

/// The raw sled baseline: one insert then one flush per operation.
struct SledBaseline {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn sled_insert_flush(duration: Duration) -> SledBaseline {
    let dir = temp_dir("sled");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .expect("opening sled");
    // About the size of an allocation record with three labels.
    let value = vec![b'x'; 200];
    let mut lat = Latencies::default();
    let started = Instant::now();
    let mut i: u64 = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        db.insert(i.to_be_bytes(), value.as_slice())
            .expect("sled insert");
        db.flush().expect("sled flush");
        lat.push(t.elapsed());
        i += 1;
    }
    let elapsed = started.elapsed();
    SledBaseline {
        rate: lat.count() as f64 / elapsed.as_secs_f64(),
        p50: lat.quantile(0.50),
        p99: lat.quantile(0.99),
    }
}

struct Row {
    concurrency: usize,
    connections: usize,
    alloc_rate: f64,
    calls_rate: f64,
    alloc_p50: Duration,
    alloc_p99: Duration,
    release_p50: Duration,
    release_p99: Duration,
    writes_per_flush: f64,
    cpu_per_write: Duration,
    empty_rate: f64,
    empty_p50: Duration,
    empty_p99: Duration,
    cpu_per_empty: Duration,
}

fn per_call(cpu: Duration, calls: usize) -> Duration {
    cpu.checked_div(u32::try_from(calls.max(1)).unwrap_or(u32::MAX))
        .unwrap_or_default()
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    println!("== Allocator throughput and latency: durable Allocate+Release over gRPC on loopback");
    println!("{} (at start)", machine());

    let sled = sled_insert_flush(MEASURE);

    let rt = runtime();
    let dir = temp_dir("throughput");
    let server = Server::start(dir.path(), &["default=10.0.0.0/8"]);
    let addr = server.addr;
    let pid = server.pid().to_string();
    let rows: Vec<Row> = rt.block_on(async {
        let mut rows = Vec::new();
        for concurrency in CONCURRENCY {
            let connections = concurrency.min(MAX_CONNECTIONS);
            let chans = channels(addr, connections).await;
            let tag = format!("c{concurrency}");

            run_empty(&chans, concurrency, WARM_UP).await;
            let cpu0 = cpu_time(&pid);
            let mut empty = run_empty(&chans, concurrency, MEASURE).await;
            let cpu_empty = cpu_time(&pid).saturating_sub(cpu0);

            run_allocate_release(&chans, concurrency, WARM_UP, "", &tag).await;
            let (w0, f0) = writes_and_flushes(addr).await;
            let cpu0 = cpu_time(&pid);
            let mut run = run_allocate_release(&chans, concurrency, MEASURE, "", &tag).await;
            let cpu_run = cpu_time(&pid).saturating_sub(cpu0);
            let (w1, f1) = writes_and_flushes(addr).await;

            let calls = run.first.count() + run.second.count();
            rows.push(Row {
                concurrency,
                connections,
                alloc_rate: run.rate(),
                calls_rate: run.calls_rate(),
                alloc_p50: run.first.quantile(0.50),
                alloc_p99: run.first.quantile(0.99),
                release_p50: run.second.quantile(0.50),
                release_p99: run.second.quantile(0.99),
                writes_per_flush: (w1 - w0) / (f1 - f0).max(1.0),
                cpu_per_write: per_call(cpu_run, calls),
                empty_rate: empty.rate(),
                empty_p50: empty.first.quantile(0.50),
                empty_p99: empty.first.quantile(0.99),
                cpu_per_empty: per_call(cpu_empty, empty.first.count()),
            });
        }
        rows
    });
    server.stop();

    println!();
    println!(
        "durable Allocate+Release of new owners, pool 10.0.0.0/8, {} s per row \
         (each loop: Allocate, then Release of the same owner)",
        MEASURE.as_secs()
    );
    let mut t = Table::new(&[
        "concurrency",
        "conns",
        "allocations/s",
        "calls/s",
        "Allocate p50",
        "Allocate p99",
        "Release p50",
        "Release p99",
        "writes/flush",
        "server CPU/call",
    ]);
    for r in &rows {
        t.row(vec![
            r.concurrency.to_string(),
            r.connections.to_string(),
            per_sec(r.alloc_rate),
            per_sec(r.calls_rate),
            ms(r.alloc_p50),
            ms(r.alloc_p99),
            ms(r.release_p50),
            ms(r.release_p99),
            format!("{:.1}", r.writes_per_flush),
            us(r.cpu_per_write),
        ]);
    }
    t.print();

    println!();
    println!(
        "baseline: empty gRPC call (grpc.health.v1.Health/Check), same server, same connections"
    );
    let mut t = Table::new(&["concurrency", "calls/s", "p50", "p99", "server CPU/call"]);
    for r in &rows {
        t.row(vec![
            r.concurrency.to_string(),
            per_sec(r.empty_rate),
            ms(r.empty_p50),
            ms(r.empty_p99),
            us(r.cpu_per_empty),
        ]);
    }
    t.print();

    println!();
    println!("baseline: raw sled insert + flush, one thread, same disk");
    let mut t = Table::new(&["operation", "ops/s", "p50", "p99"]);
    t.row(vec![
        "insert+flush".to_string(),
        per_sec(sled.rate),
        ms(sled.p50),
        ms(sled.p99),
    ]);
    t.print();

    println!();
    println!("ratios (same run)");
    let mut t = Table::new(&[
        "concurrency",
        "allocations/s ÷ empty calls/s",
        "calls/s ÷ empty calls/s",
        "Allocate p99 ÷ empty p99",
        "allocations/s ÷ sled insert+flush/s",
    ]);
    for r in &rows {
        t.row(vec![
            r.concurrency.to_string(),
            ratio(r.alloc_rate / r.empty_rate),
            ratio(r.calls_rate / r.empty_rate),
            ratio(r.alloc_p99.as_secs_f64() / r.empty_p99.as_secs_f64()),
            ratio(r.alloc_rate / sled.rate),
        ]);
    }
    t.print();

    println!();
    println!("targets at concurrency 64");
    let mut t = Table::new(&["target", "measured", "verdict"]);
    if let Some(r) = rows.iter().find(|r| r.concurrency == 64) {
        let share = r.alloc_rate / r.empty_rate;
        t.row(vec![
            "allocations/s >= 50% of empty calls/s".to_string(),
            format!("{:.0}%", share * 100.0),
            verdict(share >= 0.5).to_string(),
        ]);
        t.row(vec![
            "allocations/s >= 10,000".to_string(),
            per_sec(r.alloc_rate),
            verdict(r.alloc_rate >= 10_000.0).to_string(),
        ]);
        // The same targets read per durable call: each loop makes two
        // durable writes (Allocate and Release) for one allocation.
        let call_share = r.calls_rate / r.empty_rate;
        t.row(vec![
            "durable calls/s >= 50% of empty calls/s (per-call reading)".to_string(),
            format!("{:.0}%", call_share * 100.0),
            verdict(call_share >= 0.5).to_string(),
        ]);
        t.row(vec![
            "durable calls/s >= 10,000 (per-call reading)".to_string(),
            per_sec(r.calls_rate),
            verdict(r.calls_rate >= 10_000.0).to_string(),
        ]);
        let p99 = r.alloc_p99.max(r.release_p99);
        t.row(vec![
            "p99 <= 10 ms (Allocate and Release)".to_string(),
            ms(p99),
            verdict(p99 <= Duration::from_millis(10)).to_string(),
        ]);
    }
    t.print();
    println!();
    println!("{} (at end)", machine());
}
