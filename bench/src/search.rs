//! The search for a system's highest passing rate: double from `start` while steps pass,
//! then bisect between the last pass and the first failure. If `start` fails, halve
//! down to `min`.

/// Search bounds and effort.
#[derive(Debug, Clone, Copy)]
pub struct SearchPlan {
    /// First rate tried.
    pub start: u64,
    /// Lowest rate tried when `start` fails.
    pub min: u64,
    /// Highest rate tried.
    pub max: u64,
    /// Bisection steps after the bracket is found.
    pub bisections: u32,
    /// Bisection stops when the bracket is narrower than this share of its low end.
    pub resolution: f64,
}

/// Rounds a rate to two significant digits (readable steps: 1500, 2200, 27000).
pub fn round_rate(r: u64) -> u64 {
    if r < 100 {
        return r.max(1);
    }
    let mut unit = 1u64;
    while r / unit >= 100 {
        unit *= 10;
    }
    (r / unit) * unit
}

/// Runs the search; `pass(rate)` runs one step and says whether it met the objective.
/// Returns the highest passing rate (0 if none did).
pub fn find_max_rate(plan: SearchPlan, mut pass: impl FnMut(u64) -> bool) -> u64 {
    let mut best = 0u64;
    let mut fail: Option<u64> = None;
    let mut rate = plan.start.max(1);
    loop {
        if pass(rate) {
            best = rate;
            if rate >= plan.max {
                break;
            }
            rate = (rate * 2).min(plan.max);
        } else {
            fail = Some(rate);
            break;
        }
    }
    if best == 0 {
        // The first step failed: halve until one passes.
        let mut r = plan.start / 2;
        while r >= plan.min.max(1) {
            if pass(r) {
                best = r;
                break;
            }
            fail = Some(r);
            r /= 2;
        }
        if best == 0 {
            return 0;
        }
    }
    let Some(mut hi) = fail else {
        return best;
    };
    let mut lo = best;
    for _ in 0..plan.bisections {
        if (hi - lo) as f64 <= lo as f64 * plan.resolution {
            break;
        }
        let mid = round_rate(lo + (hi - lo) / 2);
        if mid <= lo || mid >= hi {
            break;
        }
        if pass(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// A repetition's search, started from an earlier repetition's result `hint`: steps of
/// x1.3 up from `hint` while they pass (or x0.7 down while they fail, to `plan.min`),
/// then `plan.bisections` bisections of the bracket. About 4 steps instead of a full
/// search's 8 or 9 when the hint is close; a hint that was far off is walked away from.
pub fn find_max_rate_near(plan: SearchPlan, hint: u64, mut pass: impl FnMut(u64) -> bool) -> u64 {
    let up = |r: u64| round_rate((r * 13 / 10).max(r + 1)).min(plan.max);
    let down = |r: u64| round_rate(r * 7 / 10);
    let mut rate = round_rate(hint.clamp(plan.min.max(1), plan.max));
    let (mut lo, mut hi);
    if pass(rate) {
        lo = rate;
        loop {
            if rate >= plan.max {
                return lo;
            }
            rate = up(rate);
            if pass(rate) {
                lo = rate;
            } else {
                hi = rate;
                break;
            }
        }
    } else {
        hi = rate;
        loop {
            rate = down(rate);
            if rate < plan.min.max(1) || rate >= hi {
                return 0;
            }
            if pass(rate) {
                lo = rate;
                break;
            }
            hi = rate;
        }
    }
    for _ in 0..plan.bisections {
        if (hi - lo) as f64 <= lo as f64 * plan.resolution {
            break;
        }
        let mid = round_rate(lo + (hi - lo) / 2);
        if mid <= lo || mid >= hi {
            break;
        }
        if pass(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> SearchPlan {
        SearchPlan {
            start: 1000,
            min: 100,
            max: 1_000_000,
            bisections: 3,
            resolution: 0.05,
        }
    }

    #[test]
    fn doubles_then_bisects() {
        let mut tried = Vec::new();
        let best = find_max_rate(plan(), |r| {
            tried.push(r);
            r <= 11_000
        });
        assert_eq!(
            tried,
            [1000, 2000, 4000, 8000, 16_000, 12_000, 10_000, 11_000]
        );
        assert_eq!(best, 11_000);
    }

    #[test]
    fn halves_when_the_first_step_fails() {
        let mut tried = Vec::new();
        let best = find_max_rate(plan(), |r| {
            tried.push(r);
            r <= 300
        });
        assert_eq!(&tried[..3], [1000, 500, 250]);
        assert!((250..=300).contains(&best), "{best}");
        assert_eq!(find_max_rate(plan(), |_| false), 0);
    }

    #[test]
    fn stops_at_the_maximum() {
        let p = SearchPlan {
            max: 5000,
            ..plan()
        };
        assert_eq!(find_max_rate(p, |_| true), 5000);
    }

    #[test]
    fn a_repetition_starts_from_the_hint() {
        let p = SearchPlan {
            bisections: 2,
            ..plan()
        };
        let mut tried = Vec::new();
        let best = find_max_rate_near(p, 10_000, |r| {
            tried.push(r);
            r <= 11_500
        });
        assert_eq!(tried, [10_000, 13_000, 11_000, 12_000]);
        assert_eq!(best, 11_000);
        // A hint far too high walks down.
        let mut tried = Vec::new();
        let best = find_max_rate_near(p, 10_000, |r| {
            tried.push(r);
            r <= 3000
        });
        assert_eq!(&tried[..4], [10_000, 7000, 4900, 3400]);
        assert!((2300..=3000).contains(&best), "{best}");
        assert_eq!(find_max_rate_near(p, 1000, |_| false), 0);
    }

    #[test]
    fn rounds_to_two_digits() {
        assert_eq!(round_rate(12_345), 12_000);
        assert_eq!(round_rate(999), 990);
        assert_eq!(round_rate(57), 57);
    }
}
