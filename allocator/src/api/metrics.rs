//! Prometheus metrics: RPCs by method and code, RPC latency, and the pool,
//! store and watch figures, read from the allocator at each scrape.

use std::sync::atomic::Ordering;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::engine::handle::Handle;

/// Labels of an RPC count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// gRPC method name, such as `Allocate`.
    pub method: &'static str,
    /// gRPC status code name, such as `OK` or `RESOURCE_EXHAUSTED`.
    pub code: &'static str,
}

/// Labels of an RPC latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// gRPC method name.
    pub method: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~3 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 17,
    ))
}

/// The allocator's metrics.
pub struct Metrics {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; pool and store figures are read from `ipam`.
    pub fn new(ipam: Handle) -> Self {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "vipam_grpc_requests",
            "gRPC requests by method and status code",
            rpcs.clone(),
        );
        registry.register(
            "vipam_grpc_request_duration_seconds",
            "gRPC request latency by method",
            latency.clone(),
        );
        registry.register_collector(Box::new(AllocatorCollector { ipam }));
        Metrics {
            registry,
            rpcs,
            latency,
        }
    }

    /// Counts one RPC and its latency.
    pub fn observe(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: vipam::names::code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Pool and store figures, read at scrape time.
#[derive(Clone)]
struct AllocatorCollector {
    ipam: Handle,
}

impl std::fmt::Debug for AllocatorCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocatorCollector").finish_non_exhaustive()
    }
}

impl Collector for AllocatorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(report) = self.ipam.pools_report() else {
            // A failing store shows in /readyz and the logs; the scrape still
            // returns the other metrics.
            return Ok(());
        };
        let pools = self.ipam.pools();
        type Getter = fn(&crate::model::PoolReport) -> f64;
        let per_pool: [(&str, &str, Getter); 3] = [
            ("vipam_pool_size", "Addresses the pool can hand out", |r| {
                r.size as f64
            }),
            (
                "vipam_pool_allocated",
                "Allocations in the pool's ranges",
                |r| r.allocated as f64,
            ),
            ("vipam_pool_free", "Addresses of the pool still free", |r| {
                r.free as f64
            }),
        ];
        for (name, help, get) in per_pool {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &report.pools {
                let labels = [("pool", pools.at(r.index).name())];
                ConstGauge::new(get(r)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let gauge = encoder.encode_descriptor(
            "vipam_allocations_outside_pools",
            "Allocations outside every configured pool",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(report.outside_count as i64).encode(gauge)?;
        encode_store(&mut encoder, self.ipam.stats())?;
        let hub = self.ipam.hub();
        let gauge = encoder.encode_descriptor(
            "vipam_watchers",
            "Watch streams open",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(hub.active() as i64).encode(gauge)?;
        let counter = encoder.encode_descriptor(
            "vipam_watch_cutoffs",
            "Watchers cut off for falling too far behind",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(hub.cutoffs()).encode(counter)?;
        Ok(())
    }
}

/// The store writer's counters and revision.
fn encode_store(
    encoder: &mut DescriptorEncoder,
    stats: &crate::engine::stats::Stats,
) -> Result<(), std::fmt::Error> {
    let counters = [
        (
            "vipam_store_flushes",
            "Store flushes (each makes a batch of writes durable)",
            &stats.flushes,
        ),
        (
            "vipam_store_writes",
            "Allocate and Release requests applied by the store writer",
            &stats.writes,
        ),
        (
            "vipam_store_conflicts",
            "Flushes that lost a race to another allocator sharing the store, then decided again",
            &stats.conflicts,
        ),
        (
            "vipam_store_unavailable",
            "Flushes the store could not commit (etcd unreachable or without quorum, a full disk)",
            &stats.unavailable,
        ),
        (
            "vipam_requests_abandoned",
            "Allocate and Release requests dropped undecided because their caller had gone \
             (timed out or cancelled)",
            &stats.abandoned,
        ),
    ];
    for (name, help, value) in counters {
        let counter = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value.load(Ordering::Relaxed)).encode(counter)?;
    }
    let gauge = encoder.encode_descriptor(
        "vipam_store_revision",
        "Revision of the last write to the store",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(stats.revision.load(Ordering::Relaxed) as i64).encode(gauge)?;
    Ok(())
}
