//! Prometheus metrics of the syncer.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of an error count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why, such as `pool_exhausted` or `allocator_unreachable`.
    pub reason: &'static str,
}

/// Labels of an allocator call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The RPC, such as `Allocate`.
    pub call: &'static str,
    /// Its gRPC code, such as `OK` or `UNAVAILABLE`.
    pub code: &'static str,
}

/// Labels of an Event count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The Event reason.
    pub reason: &'static str,
}

/// The syncer's metrics.
pub struct Metrics {
    registry: Registry,
    /// Services with an address.
    pub managed: Gauge,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconcile errors by reason.
    pub errors: Family<ReasonLabels, Counter>,
    /// ConfigMap writes (creates and updates).
    pub configmap_writes: Counter,
    /// Size of the last rendered ConfigMap, in bytes.
    pub configmap_bytes: Gauge,
    /// Events published by reason.
    pub events: Family<EventLabels, Counter>,
    allocator_calls: Family<CallLabels, Histogram, fn() -> Histogram>,
    /// 1 while this syncer holds the Lease.
    pub leader: Gauge,
    ready: AtomicBool,
    /// 1 while ready, for alerting on a syncer that never becomes ready.
    ready_gauge: Gauge,
}

fn latency() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            managed: Gauge::default(),
            reconciles: Counter::default(),
            errors: Family::default(),
            configmap_writes: Counter::default(),
            configmap_bytes: Gauge::default(),
            events: Family::default(),
            allocator_calls: Family::new_with_constructor(latency),
            leader: Gauge::default(),
            ready: AtomicBool::new(false),
            ready_gauge: Gauge::default(),
        };
        registry.register(
            "vipam_syncer_managed_services",
            "Services with an address",
            m.managed.clone(),
        );
        registry.register(
            "vipam_syncer_reconciles",
            "Service reconciles",
            m.reconciles.clone(),
        );
        registry.register(
            "vipam_syncer_reconcile_errors",
            "Service reconcile errors by reason",
            m.errors.clone(),
        );
        registry.register(
            "vipam_syncer_configmap_writes",
            "Writes of the keepalived ConfigMap",
            m.configmap_writes.clone(),
        );
        registry.register(
            "vipam_syncer_configmap_bytes",
            "Size of the rendered keepalived ConfigMap",
            m.configmap_bytes.clone(),
        );
        registry.register(
            "vipam_syncer_events",
            "Events published by reason",
            m.events.clone(),
        );
        registry.register(
            "vipam_syncer_allocator_call_duration_seconds",
            "Allocator calls by RPC and code",
            m.allocator_calls.clone(),
        );
        registry.register(
            "vipam_syncer_leader",
            "1 while this syncer holds the Lease",
            m.leader.clone(),
        );
        registry.register(
            "vipam_syncer_ready",
            "1 while this syncer leads and has done its first full sync",
            m.ready_gauge.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an allocator call.
    pub fn observe_allocator(&self, call: &'static str, code: tonic::Code, seconds: f64) {
        self.allocator_calls
            .get_or_create(&CallLabels {
                call,
                code: vipam::names::code_name(code),
            })
            .observe(seconds);
    }

    /// Counts a reconcile error.
    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Marks the syncer ready (leader with the first full sync done).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.ready_gauge.set(i64::from(ready));
    }

    /// Whether the syncer is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Records whether this syncer leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_exported_as_a_gauge() {
        let metrics = Metrics::new();
        assert!(
            metrics
                .render()
                .expect("render")
                .contains("vipam_syncer_ready 0")
        );
        metrics.set_ready(true);
        assert!(
            metrics
                .render()
                .expect("render")
                .contains("vipam_syncer_ready 1")
        );
        metrics.set_ready(false);
        assert!(
            metrics
                .render()
                .expect("render")
                .contains("vipam_syncer_ready 0")
        );
    }
}
