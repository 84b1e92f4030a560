//! Prefilled stores: pool-size independence of Allocate latency, and the
//! allocator's memory and data-directory size, by number of allocations.
//!
//! Each case prefills a fresh data directory through the library (the
//! allocation rules and the store the binary uses: new owners with three
//! labels as a Service's, one flush at the end), starts the real
//! `vipam-allocator` binary on it (page cache 64 MiB, its default), runs a
//! few hundred durable Allocate+Release calls over gRPC on loopback, then
//! reads VmRSS and VmHWM from /proc/PID/status and sums the sizes of the
//! files under the data directory (and the disk blocks they take).
//!
//! Pool-size independence: a /24 with 100 allocations, a /16 with 10k, a /8
//! with 1M and an IPv6 /64 with 1M, each served by its own allocator, all
//! running at once. Durable Allocate+Release of new owners at concurrency 1
//! (one connection) and 64 (eight connections), in rounds that visit the
//! cases in turn for a fixed time each (so load from elsewhere on the machine
//! falls on all cases alike); Allocate p50/p99 and allocations/s over all
//! rounds, as ratios to the /24 case of the same run (the baseline).
//!
//! Memory and disk: pool 10.0.0.0/8 with 0, 100k and 1M allocations; each
//! figure as a ratio to the empty store of the same run (the baseline), and
//! the growth per allocation. The 1M case is the same data directory as the
//! /8 case above (read before its latency runs), so a million allocations
//! are prefilled only once per family. VmHWM after the latency runs is shown
//! too.

mod common;

use std::time::Duration;

use common::{
    Latencies, Server, Table, channels, dir_size, machine, mib, ms, per_sec, prefill, ratio, rss,
    run_allocate_release, runtime, temp_dir, verdict,
};

/// Rounds of latency measurement; each round measures every case once.
const ROUNDS: u32 = 3;
/// Time of one case's measurement in one round.
const ROUND: Duration = Duration::from_secs(1);
/// Time of the warm-up before each measurement.
const WARM_UP: Duration = Duration::from_millis(200);
/// Calls made before the memory is read: four loops of Allocate+Release for
/// a short fixed time (a few hundred calls).
const TRAFFIC: Duration = Duration::from_millis(200);
/// Concurrency levels of the latency runs.
const CONCURRENCY: [usize; 2] = [1, 64];

/// One prefilled data directory.
struct Case {
    pool_name: &'static str,
    pool: &'static str,
    prefilled: u64,
    /// Part of the pool-size table.
    latency: bool,
    /// Part of the memory and disk table.
    footprint: bool,
}

const CASES: [Case; 6] = [
    Case {
        pool_name: "IPv4 /8",
        pool: "default=10.0.0.0/8",
        prefilled: 0,
        latency: false,
        footprint: true,
    },
    Case {
        pool_name: "IPv4 /24",
        pool: "default=10.0.0.0/24",
        prefilled: 100,
        latency: true,
        footprint: false,
    },
    Case {
        pool_name: "IPv4 /16",
        pool: "default=10.0.0.0/16",
        prefilled: 10_000,
        latency: true,
        footprint: false,
    },
    Case {
        pool_name: "IPv4 /8",
        pool: "default=10.0.0.0/8",
        prefilled: 100_000,
        latency: false,
        footprint: true,
    },
    Case {
        pool_name: "IPv4 /8",
        pool: "default=10.0.0.0/8",
        prefilled: 1_000_000,
        latency: true,
        footprint: true,
    },
    Case {
        pool_name: "IPv6 /64",
        pool: "default=fd00::/64",
        prefilled: 1_000_000,
        latency: true,
        footprint: false,
    },
];

/// Latency figures of one case at one concurrency.
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// What was measured on one case.
struct Measured {
    prefill: Duration,
    startup: Duration,
    calls: usize,
    rss: u64,
    hwm: u64,
    files: u64,
    blocks: u64,
    /// VmHWM after the latency runs, when there were any.
    hwm_after_load: Option<u64>,
    latency: Vec<Figures>,
}

/// A prefilled case whose allocator keeps running for the latency rounds.
struct Running {
    server: Server,
    _dir: tempfile::TempDir,
}

/// Prefills the case's data directory, starts the allocator on it, makes a
/// few hundred calls and reads memory and disk. The allocator keeps running
/// when the case has latency runs.
fn setup(rt: &tokio::runtime::Runtime, case: &Case) -> (Measured, Option<Running>) {
    let dir = temp_dir("prefilled");
    let prefill_time = prefill(dir.path(), case.pool, case.prefilled);
    let server = Server::start(dir.path(), &[case.pool]);
    let addr = server.addr;
    let calls = rt.block_on(async {
        let chans = channels(addr, 4).await;
        let run = run_allocate_release(&chans, 4, TRAFFIC, "", "warm").await;
        run.first.count() + run.second.count()
    });
    let (rss_now, hwm) = rss(server.pid());
    let (files, blocks) = dir_size(dir.path());
    let measured = Measured {
        prefill: prefill_time,
        startup: server.startup,
        calls,
        rss: rss_now,
        hwm,
        files,
        blocks,
        hwm_after_load: None,
        latency: Vec::new(),
    };
    if case.latency {
        (measured, Some(Running { server, _dir: dir }))
    } else {
        server.stop();
        (measured, None)
    }
}

/// Allocate latency of every running case at each concurrency, measured in
/// rounds that visit the cases in turn, so that load from elsewhere on the
/// machine falls on all cases alike.
fn latency_rounds(rt: &tokio::runtime::Runtime, running: &[&Running]) -> Vec<Vec<Figures>> {
    let mut per_case: Vec<Vec<Figures>> = running.iter().map(|_| Vec::new()).collect();
    for concurrency in CONCURRENCY {
        let mut alloc: Vec<Latencies> = running.iter().map(|_| Latencies::default()).collect();
        let mut elapsed = vec![Duration::ZERO; running.len()];
        rt.block_on(async {
            let mut chans = Vec::new();
            for r in running {
                chans.push(channels(r.server.addr, concurrency.min(8)).await);
            }
            let tag = format!("c{concurrency}");
            for round in 0..ROUNDS {
                for (i, c) in chans.iter().enumerate() {
                    let tag = format!("{tag}r{round}");
                    run_allocate_release(c, concurrency, WARM_UP, "", &format!("{tag}w")).await;
                    let run = run_allocate_release(c, concurrency, ROUND, "", &tag).await;
                    elapsed[i] += run.elapsed;
                    alloc[i].extend(run.first);
                }
            }
        });
        for (i, mut lat) in alloc.into_iter().enumerate() {
            per_case[i].push(Figures {
                rate: lat.count() as f64 / elapsed[i].as_secs_f64(),
                p50: lat.quantile(0.50),
                p99: lat.quantile(0.99),
            });
        }
    }
    per_case
}

fn main() {
    println!("== Prefilled stores: pool-size independence, memory and disk");
    println!("{} (at start)", machine());
    let rt = runtime();
    let mut measured = Vec::new();
    let mut running = Vec::new();
    for case in &CASES {
        let (m, r) = setup(&rt, case);
        measured.push(m);
        running.push(r);
    }
    let live: Vec<&Running> = running.iter().flatten().collect();
    let mut figures = latency_rounds(&rt, &live).into_iter();
    for (m, r) in measured.iter_mut().zip(&running) {
        if let Some(r) = r {
            m.latency = figures.next().expect("figures of every running case");
            m.hwm_after_load = Some(rss(r.server.pid()).1);
        }
    }
    for r in running.into_iter().flatten() {
        r.server.stop();
    }
    let all: Vec<(&Case, &Measured)> = CASES.iter().zip(&measured).collect();

    pool_size_tables(&all);
    footprint_tables(&all);

    println!();
    println!("setup (not part of the figures above)");
    let mut t = Table::new(&[
        "pool",
        "prefilled",
        "prefill via library",
        "per allocation",
        "binary start until serving",
    ]);
    for (case, m) in &all {
        t.row(vec![
            case.pool_name.to_string(),
            case.prefilled.to_string(),
            format!("{:.1} s", m.prefill.as_secs_f64()),
            if case.prefilled == 0 {
                "-".to_string()
            } else {
                format!(
                    "{:.1} µs",
                    m.prefill.as_secs_f64() * 1e6 / case.prefilled as f64
                )
            },
            format!("{:.2} s", m.startup.as_secs_f64()),
        ]);
    }
    t.print();
    println!();
    println!("{} (at end)", machine());
}

fn pool_size_tables(all: &[(&Case, &Measured)]) {
    let cases: Vec<&(&Case, &Measured)> = all.iter().filter(|(c, _)| c.latency).collect();
    let Some((_, base)) = cases.first() else {
        return;
    };
    println!();
    println!("-- Pool-size independence: Allocate latency with the pool prefilled");
    for (i, concurrency) in CONCURRENCY.into_iter().enumerate() {
        println!();
        println!(
            "durable Allocate+Release of new owners at concurrency {concurrency} ({} conns), \
             {ROUNDS} rounds of {} s per row, the cases in turn; baseline: the /24 case of this run",
            concurrency.min(8),
            ROUND.as_secs()
        );
        let mut t = Table::new(&[
            "pool",
            "prefilled",
            "Allocate p50",
            "÷ /24",
            "Allocate p99",
            "÷ /24",
            "allocations/s",
            "÷ /24",
        ]);
        let b = &base.latency[i];
        for (case, m) in &cases {
            let f = &m.latency[i];
            t.row(vec![
                case.pool_name.to_string(),
                case.prefilled.to_string(),
                ms(f.p50),
                ratio(f.p50.as_secs_f64() / b.p50.as_secs_f64()),
                ms(f.p99),
                ratio(f.p99.as_secs_f64() / b.p99.as_secs_f64()),
                per_sec(f.rate),
                ratio(f.rate / b.rate),
            ]);
        }
        t.print();
    }

    println!();
    println!("targets: the 1M cases within 1.5x of the /24 case (Allocate p50 and p99)");
    let mut t = Table::new(&["case", "concurrency", "p50 ÷ /24", "p99 ÷ /24", "verdict"]);
    for (case, m) in cases.iter().filter(|(c, _)| c.prefilled >= 1_000_000) {
        for (i, concurrency) in CONCURRENCY.into_iter().enumerate() {
            let b = &base.latency[i];
            let f = &m.latency[i];
            let p50 = f.p50.as_secs_f64() / b.p50.as_secs_f64();
            let p99 = f.p99.as_secs_f64() / b.p99.as_secs_f64();
            t.row(vec![
                format!("{} at {}", case.pool_name, case.prefilled),
                concurrency.to_string(),
                ratio(p50),
                ratio(p99),
                verdict(p50 <= 1.5 && p99 <= 1.5).to_string(),
            ]);
        }
    }
    t.print();
}

fn footprint_tables(all: &[(&Case, &Measured)]) {
    let cases: Vec<&(&Case, &Measured)> = all.iter().filter(|(c, _)| c.footprint).collect();
    let Some((_, base)) = cases.first() else {
        return;
    };
    let growth = |x: u64, b: u64, n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            format!("{:.0} B", (x as f64 - b as f64) / n as f64)
        }
    };
    println!();
    println!("-- Memory and disk: allocator RSS and data-directory size");
    println!();
    println!(
        "pool 10.0.0.0/8, page cache 64 MiB; read after the binary loaded the store and \
         served the calls shown; baseline: 0 allocations, this run"
    );
    let mut t = Table::new(&[
        "allocations",
        "calls",
        "VmRSS",
        "÷ empty",
        "VmHWM",
        "÷ empty",
        "RSS/alloc",
        "data files",
        "÷ empty",
        "disk blocks",
        "files/alloc",
    ]);
    for (case, m) in &cases {
        t.row(vec![
            case.prefilled.to_string(),
            m.calls.to_string(),
            mib(m.rss),
            ratio(m.rss as f64 / base.rss as f64),
            mib(m.hwm),
            ratio(m.hwm as f64 / base.hwm as f64),
            growth(m.rss, base.rss, case.prefilled),
            mib(m.files),
            ratio(m.files as f64 / base.files as f64),
            mib(m.blocks),
            growth(m.files, base.files, case.prefilled),
        ]);
    }
    t.print();

    println!();
    println!("target: RSS <= 256 MiB at 1M allocations");
    let mut t = Table::new(&["figure", "measured", "verdict"]);
    let limit: u64 = 256 << 20;
    for (case, m) in all.iter().filter(|(c, _)| c.prefilled >= 1_000_000) {
        let name = format!("{} at {}", case.pool_name, case.prefilled);
        if case.footprint {
            t.row(vec![
                format!("{name}: VmRSS after a few hundred calls"),
                mib(m.rss),
                verdict(m.rss <= limit).to_string(),
            ]);
            t.row(vec![
                format!("{name}: VmHWM (peak, incl. loading)"),
                mib(m.hwm),
                verdict(m.hwm <= limit).to_string(),
            ]);
        }
        if let Some(hwm) = m.hwm_after_load {
            t.row(vec![
                format!("{name}: VmHWM after the latency runs"),
                mib(hwm),
                verdict(hwm <= limit).to_string(),
            ]);
        }
    }
    t.print();
}
