//! Prometheus text exposition of the server's counters, gauges and histograms.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative), then the overflow bucket.
    counts: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len() + 1;
        Histogram { bounds, counts: Mutex::new((vec![0; n], 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.0[i] += 1;
        c.1 += v;
        c.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&c.0) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", c.2, c.1, c.2);
    }
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Metrics {
    pub requests: Counter,
    pub request_errors: Counter,
    pub rejected_queue_full: Counter,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub steered_requests: Counter,
    pub hidden_state_requests: Counter,
    pub passes: Counter,
    pub running: AtomicU64,
    pub queued: AtomicU64,
    pub cached_prefixes: AtomicU64,
    pub cached_prefix_tokens: AtomicU64,
    pub rows_per_pass: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        Metrics {
            requests: Counter::default(),
            request_errors: Counter::default(),
            rejected_queue_full: Counter::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            steered_requests: Counter::default(),
            hidden_state_requests: Counter::default(),
            passes: Counter::default(),
            running: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            cached_prefixes: AtomicU64::new(0),
            cached_prefix_tokens: AtomicU64::new(0),
            rows_per_pass: Histogram::new((0..13).map(|k| (1u64 << k) as f64).collect()),
            time_to_first_token: latency(),
            inter_token_latency: latency(),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 9] = [
            ("resid_requests_total", "Requests received on the API routes.", &self.requests),
            ("resid_request_errors_total", "Requests answered with an error status.", &self.request_errors),
            ("resid_requests_rejected_queue_full_total", "Requests refused with 429 because the queue was full.", &self.rejected_queue_full),
            ("resid_prompt_tokens_total", "Prompt tokens of admitted requests.", &self.prompt_tokens),
            ("resid_prompt_tokens_cached_total", "Prompt tokens taken from the prefix cache instead of prefilled.", &self.cached_prompt_tokens),
            ("resid_generation_tokens_total", "Tokens generated.", &self.generation_tokens),
            ("resid_steered_requests_total", "Requests with steering.", &self.steered_requests),
            ("resid_hidden_state_requests_total", "Hidden-state (extraction) requests.", &self.hidden_state_requests),
            ("resid_forward_passes_total", "Forward passes run by the scheduler.", &self.passes),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
        }
        for (name, help, g) in [
            ("resid_requests_running", "Sequences generating and capture jobs under way.", &self.running),
            ("resid_requests_queued", "Requests waiting for admission.", &self.queued),
            ("resid_prefix_cache_sequences", "Finished sequences whose keys and values the prefix cache holds.", &self.cached_prefixes),
            ("resid_prefix_cache_tokens", "Tokens whose keys and values the prefix cache holds.", &self.cached_prefix_tokens),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", g.load(Ordering::Relaxed));
        }
        self.rows_per_pass.render(&mut out, "resid_rows_per_pass", "Rows (tokens) packed into each forward pass.");
        self.time_to_first_token.render(&mut out, "resid_time_to_first_token_seconds", "From a request's arrival to its first token.");
        self.inter_token_latency.render(&mut out, "resid_inter_token_latency_seconds", "Between consecutive tokens of one sequence.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(vec![1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\nx_sum 6\nx_count 4\n"), "{s}");
    }
}
