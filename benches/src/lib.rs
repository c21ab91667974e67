//! Shared pieces of Warren's benchmarks (one binary per benchmark in
//! `src/bin`, run through `cargo xtask bench NAME`).

pub mod agentd;

/// Percentiles of a sample, nearest-rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (must not be empty).
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "no samples");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Summary {
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
        }
    }

    /// As a JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

/// `p50/p99` of a [`Summary::json`] object, for benchmark tables.
pub fn p50_p99(v: &serde_json::Value) -> String {
    format!(
        "{:.2}/{:.2}",
        v["p50"].as_f64().unwrap_or(0.0),
        v["p99"].as_f64().unwrap_or(0.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.p50, s.max), (2.0, 3.0));
    }
}
