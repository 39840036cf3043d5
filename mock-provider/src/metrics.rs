//! The mock provider's metric families, named once here (see `docs/METRICS.md`), in a
//! registry of its own per mock server, served on its `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Label of [`MockMetrics::requests`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MockRequestLabel {
    /// The route's name.
    pub route: &'static str,
    /// `ok`, the problem code answered, or `answer_lost`.
    pub outcome: &'static str,
}

/// Label of [`MockMetrics::duration`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MockRouteLabel {
    /// The route's name.
    pub route: &'static str,
}

fn mock_buckets() -> Histogram {
    // 50 µs to ~3.3 s (injected hangs land in +Inf).
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// The mock provider's families, in a registry of its own (one per mock server, served on
/// its `GET /metrics`).
#[derive(Debug)]
pub struct MockMetrics {
    registry: Registry,
    /// `flashsale_mock_requests_total{route,outcome}`.
    pub requests: Family<MockRequestLabel, Counter>,
    /// `flashsale_mock_request_duration_seconds{route}`.
    pub duration: HistogramFamily<MockRouteLabel>,
}

impl Default for MockMetrics {
    fn default() -> Self {
        let requests = Family::<MockRequestLabel, Counter>::default();
        let duration: HistogramFamily<MockRouteLabel> = Family::new_with_constructor(mock_buckets);
        let mut registry = Registry::default();
        registry.register(
            "flashsale_mock_requests",
            "Requests answered by the mock provider",
            requests.clone(),
        );
        registry.register(
            "flashsale_mock_request_duration_seconds",
            "Time the mock provider took to answer",
            duration.clone(),
        );
        MockMetrics {
            registry,
            requests,
            duration,
        }
    }
}

impl MockMetrics {
    /// Records one request.
    pub fn request(&self, route: &'static str, outcome: &'static str, elapsed: Duration) {
        self.requests
            .get_or_create(&MockRequestLabel { route, outcome })
            .inc();
        self.duration
            .get_or_create(&MockRouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition of the mock's families (OpenMetrics when `openmetrics`, else the
    /// text format 0.0.4) and its content type.
    pub fn encode(&self, openmetrics: bool) -> (String, &'static str) {
        storage::exposition::render(&self.registry, openmetrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_metrics_live_in_their_own_registry() {
        let (one, two) = (MockMetrics::default(), MockMetrics::default());
        one.request("charge", "ok", Duration::from_millis(2));
        assert!(one
            .encode(true)
            .0
            .contains("flashsale_mock_requests_total{route=\"charge\",outcome=\"ok\"} 1"));
        assert!(!two.encode(true).0.contains("route=\"charge\""));
    }
}
