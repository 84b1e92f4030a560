//! Syncer benchmarks on the Kubernetes API test server, with the real
//! `vipam-syncer` and `vipam-allocator` binaries (release builds):
//!
//! - **Convergence**: 1k and 10k LoadBalancer Services created at once;
//!   time until every Service has its status IP and the ConfigMap holds
//!   every entry, the API writes per Service, the ConfigMap writes and the
//!   shortest gap between two of them, and the writes during a quiet period
//!   afterwards that spans a full resync.
//! - **Cold start**: the syncer restarted with 10k Services that already
//!   have their IPs; time until ready, and the writes it makes.
//!
//! Baselines, measured in the same run on a server of their own: for
//! convergence, a plain client doing only the indispensable work (one
//! Allocate and one status PATCH per Service, 64 at a time, as the syncer's
//! concurrency); for a cold start, listing the Services in pages of 500 as
//! the syncer's watcher does, plus listing the allocator's allocations.
//!
//! Services are created in-process on the test server, so the request log
//! holds only what the syncer sends. They set
//! `allocateLoadBalancerNodePorts: false`: 10k LoadBalancer Services with
//! node ports do not fit the default node port range of a real cluster
//! either.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, stream};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use vipam::v1::AllocateRequest;
use vipam_e2e::{
    Allocator,
    syncer::{CONFIG_MAP, Kube, Syncer, allocator_client, owner},
};
use vipam_kube_api::{LoggedRequest, TestServer};

/// Service counts of the convergence benchmark.
const SIZES: [usize; 2] = [1_000, 10_000];
/// The syncer's resync period here; the quiet period covers one.
const RESYNC: Duration = Duration::from_secs(10);
/// How long nothing changes while writes are counted.
const QUIET: Duration = Duration::from_secs(15);
/// How often convergence is checked (each check walks every Service, so
/// not more often: it would load the machine under measurement).
const POLL: Duration = Duration::from_millis(200);
/// Longest a run may take before the benchmark gives up.
const TIMEOUT: Duration = Duration::from_secs(600);
/// The pool the Services' addresses come from.
const POOL: &str = "default=10.200.0.0/16";
/// Requests the baseline client keeps in flight (the syncer's concurrency).
const BASELINE_CONCURRENCY: usize = 64;
/// Page size of the baseline list (the watcher's default).
const PAGE: u32 = 500;

/// Writes by what they wrote.
#[derive(Debug, Default, Clone, Copy)]
struct Writes {
    services: usize,
    statuses: usize,
    events: usize,
    configmaps: usize,
    leases: usize,
    other: usize,
}

impl Writes {
    fn of(requests: &[LoggedRequest]) -> Writes {
        let mut w = Writes::default();
        for r in requests.iter().filter(|r| r.is_write()) {
            let path = r.path_only();
            if path.contains("/services/") && path.ends_with("/status") {
                w.statuses += 1;
            } else if path.contains("/services") {
                w.services += 1;
            } else if path.contains("/events") {
                w.events += 1;
            } else if path.contains("/configmaps") {
                w.configmaps += 1;
            } else if path.contains("/leases") {
                w.leases += 1;
            } else {
                w.other += 1;
            }
        }
        w
    }

    /// Writes about Services: their metadata, status and Events.
    fn per_service(&self) -> usize {
        self.services + self.statuses + self.events
    }

    /// Everything but Lease renewals, which leader election needs.
    fn besides_leases(&self) -> usize {
        self.per_service() + self.configmaps + self.other
    }
}

/// The shortest time between two successive ConfigMap writes, and the most
/// of them that fell within any 100 ms.
fn configmap_spacing(requests: &[LoggedRequest]) -> (Option<Duration>, usize) {
    let mut at: Vec<Instant> = requests
        .iter()
        .filter(|r| r.is_write() && r.path_only().contains("/configmaps"))
        .map(|r| r.at)
        .collect();
    at.sort();
    let gap = at.windows(2).map(|w| w[1] - w[0]).min();
    let window = Duration::from_millis(100);
    let most = (0..at.len())
        .map(|i| at[i..].iter().take_while(|t| **t - at[i] < window).count())
        .max()
        .unwrap_or(0);
    (gap, most)
}

struct Converged {
    n: usize,
    create: Duration,
    converge: Duration,
    writes: Writes,
    cm_gap: Option<Duration>,
    cm_most_per_100ms: usize,
    quiet: Writes,
    baseline: Duration,
}

struct ColdStart {
    n: usize,
    ready: Duration,
    writes: Writes,
    baseline: Duration,
}

fn lb(kube: &Kube, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": kube.namespace},
        "spec": {
            "type": "LoadBalancer",
            "allocateLoadBalancerNodePorts": false,
            "ports": [{"port": 80}],
        },
    })
}

fn test_server(kube: &Kube) -> Result<&TestServer> {
    match kube.server() {
        Some(server) => Ok(server),
        None => bail!("the syncer benchmarks run on the test server; unset VIPAM_E2E_KUBECONFIG"),
    }
}

fn create_services(kube: &Kube, n: usize) -> Result<Duration> {
    let server = test_server(kube)?;
    let started = Instant::now();
    for i in 0..n {
        server
            .seed(lb(kube, &format!("svc-{i:05}")))
            .map_err(|e| anyhow::anyhow!("creating Service {i}: {e}"))?;
    }
    Ok(started.elapsed())
}

/// Services with a status IP, and ConfigMap entries (read only once every
/// Service has its IP: copying a ConfigMap of thousands of entries every
/// poll would load the machine under measurement).
fn progress(kube: &Kube, n: usize) -> Result<(usize, usize)> {
    let server = test_server(kube)?;
    let with_ip = server.count("services", Some(&kube.namespace), |s| {
        s.get("status")
            .and_then(|s| s.get("loadBalancer"))
            .and_then(|l| l.get("ingress"))
            .and_then(|i| i.get(0))
            .and_then(|i| i.get("ip"))
            .is_some()
    });
    if with_ip < n {
        return Ok((with_ip, 0));
    }
    let entries = server
        .get("configmaps", Some(&kube.system_namespace), CONFIG_MAP)
        .and_then(|cm| cm.get("data").and_then(Value::as_object).map(|d| d.len()))
        .unwrap_or(0);
    Ok((with_ip, entries))
}

/// Checks that the ConfigMap maps each Service's status IP to the Service.
fn check_consistent(kube: &Kube, n: usize) -> Result<()> {
    let server = test_server(kube)?;
    let data: BTreeMap<String, String> = server
        .get("configmaps", Some(&kube.system_namespace), CONFIG_MAP)
        .and_then(|cm| cm.get("data").cloned())
        .map(serde_json::from_value)
        .transpose()?
        .unwrap_or_default();
    let services = server.list("services", Some(&kube.namespace));
    if services.len() != n || data.len() != n {
        bail!(
            "{} Services and {} ConfigMap entries, expected {n} of each",
            services.len(),
            data.len()
        );
    }
    for s in &services {
        let name = s.pointer("/metadata/name").and_then(Value::as_str);
        let ip = s
            .pointer("/status/loadBalancer/ingress/0/ip")
            .and_then(Value::as_str);
        let (Some(name), Some(ip)) = (name, ip) else {
            bail!("a Service without a name or status IP: {s}");
        };
        let entry = data.get(ip).map(String::as_str);
        if entry != Some(&format!("{}/{name}", kube.namespace)) {
            bail!("ConfigMap entry for {ip} is {entry:?}, expected Service {name}");
        }
    }
    Ok(())
}

async fn wait_converged(kube: &Kube, n: usize, syncer: &Syncer) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (with_ip, entries) = progress(kube, n)?;
        if with_ip == n && entries == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not converged after {TIMEOUT:?}: {with_ip}/{n} Services with an IP, \
                 {entries}/{n} ConfigMap entries; syncer log tail:\n{}",
                tail(&syncer.log(), 40)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn syncer_args() -> Vec<String> {
    vec![
        "--resync".into(),
        format!("{}s", RESYNC.as_secs()),
        // The production defaults, over the short test settings.
        "--lease-duration".into(),
        "15s".into(),
        "--configmap-coalesce".into(),
        "200ms".into(),
    ]
}

fn start_syncer(kube: &Kube, allocator: &Allocator) -> Result<Syncer> {
    let args = syncer_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    kube.syncer(allocator, &args)
}

/// Convergence of `n` new Services; then, for the largest `n`, a cold start.
async fn converge(n: usize, cold_start: bool) -> Result<(Converged, Option<ColdStart>)> {
    let baseline = baseline_converge(n).await?;

    let kube = Kube::start("bench").await?;
    let server = test_server(&kube)?;
    let allocator = kube.allocator(&[POOL])?;
    let syncer = start_syncer(&kube, &allocator)?;
    syncer.wait_ready().await?;
    server.take_requests();

    let started = Instant::now();
    let create = create_services(&kube, n)?;
    wait_converged(&kube, n, &syncer).await?;
    let converge = started.elapsed();
    let requests = server.take_requests();
    check_consistent(&kube, n)?;
    let (cm_gap, cm_most_per_100ms) = configmap_spacing(&requests);

    tokio::time::sleep(QUIET).await;
    let quiet = Writes::of(&server.take_requests());
    check_consistent(&kube, n)?;

    let converged = Converged {
        n,
        create,
        converge,
        writes: Writes::of(&requests),
        cm_gap,
        cm_most_per_100ms,
        quiet,
        baseline,
    };
    if !cold_start {
        return Ok((converged, None));
    }

    // Cold start: the same syncer (same identity, so it takes its own Lease
    // back at once) restarted over everything in place.
    let baseline = baseline_cold_start(&kube, &allocator).await?;
    let mut syncer = syncer;
    syncer.terminate(Duration::from_secs(30))?;
    server.take_requests();
    let started = Instant::now();
    let syncer = syncer.restart()?;
    syncer.wait_ready().await?;
    let ready = started.elapsed();
    tokio::time::sleep(QUIET).await;
    let writes = Writes::of(&server.take_requests());
    check_consistent(&kube, n)?;
    Ok((
        converged,
        Some(ColdStart {
            n,
            ready,
            writes,
            baseline,
        }),
    ))
}

/// The least work convergence needs: per Service one Allocate and one
/// status PATCH, `BASELINE_CONCURRENCY` at a time, on a server and an
/// allocator of its own.
async fn baseline_converge(n: usize) -> Result<Duration> {
    let kube = Kube::start("bench-baseline").await?;
    let allocator = kube.allocator(&[POOL])?;
    create_services(&kube, n)?;
    let client = Arc::new(allocator_client(&allocator)?);
    let services = kube.services();
    let namespace = kube.namespace.clone();
    let started = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let services = services.clone();
            let namespace = namespace.clone();
            async move {
                let name = format!("svc-{i:05}");
                let allocation = client
                    .allocate(AllocateRequest {
                        owner: owner(&namespace, &name),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("allocating for {name}"))?;
                let status =
                    json!({"status": {"loadBalancer": {"ingress": [{"ip": allocation.address}]}}});
                services
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("patching the status of {name}"))?;
                Ok(())
            }
        })
        .buffer_unordered(BASELINE_CONCURRENCY)
        .collect()
        .await;
    let elapsed = started.elapsed();
    results.into_iter().collect::<Result<()>>()?;
    Ok(elapsed)
}

/// What a cold start must read at least: every Service, in pages as the
/// watcher lists them, and every allocation.
async fn baseline_cold_start(kube: &Kube, allocator: &Allocator) -> Result<Duration> {
    let services: Api<Service> = Api::all(kube.client.clone());
    let client = allocator_client(allocator)?;
    let started = Instant::now();
    let mut listed = 0;
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = services.list(&params).await?;
        listed += page.items.len();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let allocations = client.list_all("", "").await?.len();
    let elapsed = started.elapsed();
    if listed == 0 || allocations == 0 {
        bail!("the baseline listed {listed} Services and {allocations} allocations");
    }
    Ok(elapsed)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("machine: {cpus} CPUs; load average {}", load.join(" "))
}

/// A plain-text table with columns sized to their content.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "MISSED" }.into()
}

fn report(runs: &[Converged], cold: &[ColdStart]) {
    println!();
    println!(
        "convergence: N LoadBalancer Services created at once; syncer --resync {}s, \
         --configmap-coalesce 200ms; allocator pool {POOL}",
        RESYNC.as_secs()
    );
    table(
        &[
            "services",
            "create",
            "converged",
            "baseline",
            "ratio",
            "writes/Service",
            "metadata",
            "status",
            "events",
            "ConfigMap writes",
            "min gap",
            "most in 100 ms",
            "Lease",
        ],
        &runs
            .iter()
            .map(|r| {
                vec![
                    r.n.to_string(),
                    secs(r.create),
                    secs(r.converge),
                    secs(r.baseline),
                    ratio(r.converge, r.baseline),
                    format!("{:.2}", r.writes.per_service() as f64 / r.n as f64),
                    r.writes.services.to_string(),
                    r.writes.statuses.to_string(),
                    r.writes.events.to_string(),
                    r.writes.configmaps.to_string(),
                    ms(r.cm_gap),
                    r.cm_most_per_100ms.to_string(),
                    r.writes.leases.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!(
        "(converged: from the first create until every status and the ConfigMap are complete, \
         checked every {} ms; baseline: one Allocate + one status PATCH per Service, \
         {BASELINE_CONCURRENCY} at a time)",
        POLL.as_millis()
    );

    println!();
    println!(
        "quiet period: {} s with no change, spanning a full resync",
        QUIET.as_secs()
    );
    table(
        &[
            "services",
            "Service writes",
            "ConfigMap writes",
            "other writes",
            "Lease renewals",
        ],
        &runs
            .iter()
            .map(|r| {
                vec![
                    r.n.to_string(),
                    r.quiet.per_service().to_string(),
                    r.quiet.configmaps.to_string(),
                    r.quiet.other.to_string(),
                    r.quiet.leases.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );

    println!();
    println!("cold start: the syncer restarted with every Service already holding its IP");
    table(
        &[
            "services",
            "ready after",
            "baseline",
            "ratio",
            "writes besides the Lease (start + quiet)",
            "Lease writes",
        ],
        &cold
            .iter()
            .map(|c| {
                vec![
                    c.n.to_string(),
                    secs(c.ready),
                    secs(c.baseline),
                    ratio(c.ready, c.baseline),
                    c.writes.besides_leases().to_string(),
                    c.writes.leases.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!(
        "(ready: from starting the process until /readyz answers 200; baseline: listing every \
         Service in pages of {PAGE} and every allocation)"
    );

    println!();
    println!("targets");
    let mut rows = Vec::new();
    if let Some(big) = runs.iter().max_by_key(|r| r.n) {
        rows.push(vec![
            format!("{} Services converge in <= 60 s", big.n),
            secs(big.converge),
            verdict(big.converge <= Duration::from_secs(60)),
        ]);
    }
    for r in runs {
        let per = r.writes.per_service() as f64 / r.n as f64;
        rows.push(vec![
            format!("<= 3 writes per Service ({})", r.n),
            format!("{per:.2}"),
            verdict(per <= 3.0),
        ]);
        rows.push(vec![
            format!("<= 1 ConfigMap write per 100 ms of burst ({})", r.n),
            format!("{} at most", r.cm_most_per_100ms),
            verdict(r.cm_most_per_100ms <= 1),
        ]);
        let quiet = r.quiet.besides_leases();
        rows.push(vec![
            format!("0 writes when quiet, Lease renewals aside ({})", r.n),
            quiet.to_string(),
            verdict(quiet == 0),
        ]);
    }
    table(&["target", "measured", "verdict"], &rows);
}

fn main() -> Result<()> {
    println!("== Syncer: convergence and cold start on the Kubernetes API test server");
    println!("{} (at start)", machine());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (runs, cold) = runtime.block_on(async {
        let mut runs = Vec::new();
        let mut cold = Vec::new();
        let largest = SIZES.iter().copied().max().unwrap_or(0);
        for n in SIZES {
            let (run, cold_start) = converge(n, n == largest).await?;
            runs.push(run);
            cold.extend(cold_start);
        }
        anyhow::Ok((runs, cold))
    })?;
    report(&runs, &cold);
    println!();
    println!("{} (at end)", machine());
    Ok(())
}
