//! Where a forward pass's time goes (`resid bench --profile`): the forward pass marks the end
//! of each operation, and the backend charges the time since the previous mark to it. On the
//! CPU that is wall time; on a device it is the time between events on its stream, so time the
//! device sat idle waiting for the host is charged to the operation that was late.

/// Seconds and marks per operation, in the order operations were first seen; on a device, also
/// the host's seconds between the same marks (device ≫ host: the device is the limit; host ≈
/// device: the device waits for launches).
#[derive(Debug, Default, Clone)]
pub struct OpTimes {
    pub ops: Vec<(&'static str, f64, usize)>,
    pub host: Vec<(&'static str, f64)>,
}

impl OpTimes {
    pub fn charge(&mut self, label: &'static str, seconds: f64) {
        match self.ops.iter_mut().find(|(l, _, _)| *l == label) {
            Some(entry) => {
                entry.1 += seconds;
                entry.2 += 1;
            }
            None => self.ops.push((label, seconds, 1)),
        }
    }

    pub fn charge_host(&mut self, label: &'static str, seconds: f64) {
        match self.host.iter_mut().find(|(l, _)| *l == label) {
            Some(entry) => entry.1 += seconds,
            None => self.host.push((label, seconds)),
        }
    }

    pub fn total(&self) -> f64 {
        self.ops.iter().map(|(_, s, _)| s).sum()
    }

    /// `[{op, seconds, share, marks, host_seconds?}]`, largest first.
    pub fn to_json(&self) -> serde_json::Value {
        let total = self.total().max(1e-12);
        let round = |x: f64| (x * 1e6).round() / 1e6;
        let mut ops = self.ops.clone();
        ops.sort_by(|a, b| b.1.total_cmp(&a.1));
        ops.iter()
            .map(|(l, s, n)| {
                let mut op = serde_json::json!({ "op": l, "seconds": round(*s), "share": (s / total * 1e4).round() / 1e4, "marks": n });
                if let Some((_, h)) = self.host.iter().find(|(hl, _)| hl == l) {
                    op["host_seconds"] = serde_json::json!(round(*h));
                }
                op
            })
            .collect()
    }
}

/// Wall-clock marks, for backends whose operations are synchronous.
#[derive(Default)]
pub struct WallMarks {
    last: Option<std::time::Instant>,
    pub times: OpTimes,
}

impl WallMarks {
    pub fn mark(&mut self, label: &'static str) {
        self.mark_at(label, std::time::Instant::now());
    }

    /// [`mark`](Self::mark) at a given instant (the tests' clock).
    fn mark_at(&mut self, label: &'static str, now: std::time::Instant) {
        if let Some(last) = self.last {
            self.times.charge(label, now.saturating_duration_since(last).as_secs_f64());
        }
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a clock of our own: exact charges, whatever the machine's load.
    #[test]
    fn marks_charge_the_time_since_the_previous_mark() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = WallMarks::default();
        m.mark_at("start", at(0));
        m.mark_at("slow", at(20));
        m.mark_at("fast", at(21));
        m.mark_at("slow", at(26));
        let ops = &m.times.ops;
        // The first mark only starts the clock; each later one is charged since the one before.
        assert_eq!(ops.iter().map(|o| o.0).collect::<Vec<_>>(), ["slow", "fast"]);
        assert_eq!(ops[0].2, 2);
        assert!((ops[0].1 - 0.025).abs() < 1e-9 && (ops[1].1 - 0.001).abs() < 1e-9, "{ops:?}");
        assert!((m.times.total() - 0.026).abs() < 1e-9);
        let json = m.times.to_json();
        assert_eq!((json[0]["op"].as_str(), json[1]["op"].as_str()), (Some("slow"), Some("fast")));
        assert_eq!(json[0]["marks"], 2);
        assert!((json[0]["share"].as_f64().unwrap() - 0.9615).abs() < 1e-9, "{json}");
        // The real clock charges through the same path.
        m.mark("fast");
        assert_eq!(m.times.ops[1].2, 2);
    }
}
