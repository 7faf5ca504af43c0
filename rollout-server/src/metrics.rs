//! Prometheus metrics, vLLM's set under the `tandem:` prefix
//! (`vllm:num_requests_running` is `tandem:num_requests_running`, ...).
//! Updated by the engine thread; every metric is atomic.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds (vLLM's time-to-first-token buckets, extended).
const LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    /// Sequences in the running batch.
    pub num_requests_running: Gauge,
    /// Sequences waiting for admission.
    pub num_requests_waiting: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Finished sequences by `finished_reason` (stop, length, abort).
    pub request_success: Family<Vec<(String, String)>, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub weight_version: Gauge,
    /// Share of the KV cache's sequence slots in use (vLLM's
    /// `kv_cache_usage_perc`; here a slot is preallocated at full length,
    /// so this is what limits admission).
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            request_success: Family::default(),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            e2e_request_latency: Histogram::new(LATENCY_BUCKETS),
            weight_version: Gauge::default(),
            kv_cache_usage: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tandem:num_requests_running",
            "Number of sequences in the running batch",
            m.num_requests_running.clone(),
        );
        registry.register(
            "tandem:num_requests_waiting",
            "Number of sequences waiting to be admitted",
            m.num_requests_waiting.clone(),
        );
        registry.register(
            "tandem:prompt_tokens",
            "Number of prefilled prompt tokens",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "tandem:generation_tokens",
            "Number of generated tokens",
            m.generation_tokens.clone(),
        );
        registry.register(
            "tandem:request_success",
            "Number of finished sequences by finished_reason",
            m.request_success.clone(),
        );
        registry.register(
            "tandem:time_to_first_token_seconds",
            "Time from arrival to the first generated token, per sequence",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "tandem:inter_token_latency_seconds",
            "Time between two generated tokens of a sequence",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "tandem:e2e_request_latency_seconds",
            "Time from arrival to the end of a sequence",
            m.e2e_request_latency.clone(),
        );
        registry.register(
            "tandem:weight_version",
            "Version of the weights being served",
            m.weight_version.clone(),
        );
        registry.register(
            "tandem:kv_cache_usage_perc",
            "KV-cache usage: the share of sequence slots in use, 1 = full",
            m.kv_cache_usage.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a finished sequence and its end-to-end latency.
    pub fn record_finish(&self, reason: &str, arrived: Instant) {
        self.request_success
            .get_or_create(&vec![("finished_reason".to_string(), reason.to_string())])
            .inc();
        self.e2e_request_latency
            .observe(arrived.elapsed().as_secs_f64());
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
