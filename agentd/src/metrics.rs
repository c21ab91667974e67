//! The node's Prometheus metrics (`GET /metrics`): pool sizes per key,
//! sessions by state, boot and handout latency histograms, metered CPU and
//! memory, scrubbed bytes. Gauges that mirror live state (pool sizes,
//! running sessions) are set just before each scrape.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u32,
    /// Backend.
    pub backend: String,
}

/// Labels carrying one string value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: String,
}

/// Labels carrying an end reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// Labels of the backend info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `microvm` or `namespace`.
    pub backend: String,
    /// The boundary in words.
    pub isolation: String,
}

/// Labels of a handout histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoutLabels {
    /// `pool` or `on_demand`.
    pub source: String,
}

/// Every metric agentd exports.
pub struct Metrics {
    registry: Registry,
    /// Ready guests per pool.
    pub pool_ready: Family<PoolLabels, Gauge>,
    /// Booting guests per pool.
    pub pool_booting: Family<PoolLabels, Gauge>,
    /// Target per pool.
    pub pool_target: Family<PoolLabels, Gauge>,
    /// Sessions by state (running, ending).
    pub sessions: Family<StateLabel, Gauge>,
    /// Sessions ended, by reason.
    pub sessions_ended: Family<ReasonLabel, Counter>,
    /// Spawn → hello.
    pub boot_seconds: Histogram,
    /// Boots that failed.
    pub boot_failures: Counter,
    /// Request in → session bound.
    pub handout_seconds: Family<HandoutLabels, Histogram>,
    /// Sum of final CPU metering of ended sessions.
    pub metered_cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Sum of memory GiB·s of ended sessions.
    pub metered_memory_gib_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Bytes wiped at teardown.
    pub scrubbed_bytes: Counter,
    /// 429 answers.
    pub capacity_rejections: Counter,
    /// The backend in use (value 1).
    pub backend_info: Family<BackendLabels, Gauge>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let pool_ready = Family::<PoolLabels, Gauge>::default();
        let pool_booting = Family::<PoolLabels, Gauge>::default();
        let pool_target = Family::<PoolLabels, Gauge>::default();
        let sessions = Family::<StateLabel, Gauge>::default();
        let sessions_ended = Family::<ReasonLabel, Counter>::default();
        let boot_seconds = Histogram::new(latency_buckets());
        let boot_failures = Counter::default();
        let handout_seconds =
            Family::<HandoutLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        let metered_cpu_seconds = Counter::<f64, _>::default();
        let metered_memory_gib_seconds = Counter::<f64, _>::default();
        let scrubbed_bytes = Counter::default();
        let capacity_rejections = Counter::default();
        let backend_info = Family::<BackendLabels, Gauge>::default();
        registry.register("pool_ready", "Ready guests per pool key", pool_ready.clone());
        registry.register("pool_booting", "Guests booting per pool key", pool_booting.clone());
        registry.register("pool_target", "Ready guests wanted per pool key", pool_target.clone());
        registry.register("sessions", "Sessions by state", sessions.clone());
        registry.register("sessions_ended", "Sessions ended, by reason", sessions_ended.clone());
        registry.register("boot_seconds", "Guest spawn to hello", boot_seconds.clone());
        registry.register("boot_failures", "Guest boots that failed", boot_failures.clone());
        registry.register(
            "handout_seconds",
            "Session request in to guest bound",
            handout_seconds.clone(),
        );
        registry.register(
            "metered_cpu_seconds",
            "On-CPU seconds metered to ended sessions",
            metered_cpu_seconds.clone(),
        );
        registry.register(
            "metered_memory_gib_seconds",
            "Resident guest memory GiB-seconds metered to ended sessions",
            metered_memory_gib_seconds.clone(),
        );
        registry.register("scrubbed_bytes", "Bytes wiped at teardown", scrubbed_bytes.clone());
        registry.register(
            "capacity_rejections",
            "Session requests refused at capacity (429)",
            capacity_rejections.clone(),
        );
        registry.register("backend_info", "The isolation backend in use", backend_info.clone());
        Metrics {
            registry,
            pool_ready,
            pool_booting,
            pool_target,
            sessions,
            sessions_ended,
            boot_seconds,
            boot_failures,
            handout_seconds,
            metered_cpu_seconds,
            metered_memory_gib_seconds,
            scrubbed_bytes,
            capacity_rejections,
            backend_info,
        }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
