//! The load test's own options, and the goose defaults they imply.

use clap::{Parser, ValueEnum};
use goose::config::GooseConfiguration;
use std::path::PathBuf;
use std::time::Duration;

/// The development JWT secret of `flashsale serve` (`auth.jwt_secret`'s default).
pub const DEV_JWT_SECRET: &str = "flashsale-dev-secret-change-me";
/// The development operator token of `flashsale serve` (`auth.operator_token`'s default).
pub const DEV_OPERATOR_TOKEN: &str = "flashsale-dev-operator-token";

/// Which load to put on the sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioKind {
    /// Every user buys the moment the sale opens, as fast as it can.
    Rush,
    /// A constant arrival rate of orders (`--rate`, goose's `--throttle-requests`).
    Steady,
    /// Clients with a short timeout retry with the same Idempotency-Key.
    RetryStorm,
    /// Read the sale, buy, poll the order until it is final.
    BrowseBuy,
}

impl ScenarioKind {
    /// The name on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Rush => "rush",
            ScenarioKind::Steady => "steady",
            ScenarioKind::RetryStorm => "retry-storm",
            ScenarioKind::BrowseBuy => "browse-buy",
        }
    }
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// goose load test of a running flashsale endpoint; goose's own options go after `--`
/// (`loadtest -- --help` lists them).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "loadtest",
    version,
    after_help = "Goose options go after `--`, e.g. `loadtest --scenario steady --rate 100 -- -u 50 -t 30s`; \
                  `loadtest -- --help` lists them.\nExit code: 0 every check passed, 1 a check failed, 2 the run could not start."
)]
pub struct Args {
    /// Load shape.
    #[arg(long, value_enum, default_value_t = ScenarioKind::Rush, env = "FLASHSALE_LOADTEST_SCENARIO")]
    pub scenario: ScenarioKind,
    /// Base URL of the flashsale API (goose's -H after `--` wins over it).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        env = "FLASHSALE_LOADTEST_HOST"
    )]
    pub host: String,
    /// Use this existing sale instead of creating one.
    #[arg(long, env = "FLASHSALE_LOADTEST_SALE")]
    pub sale: Option<String>,
    /// Stock of the sale created for the run.
    #[arg(long, default_value_t = 1000, env = "FLASHSALE_LOADTEST_STOCK",
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub stock: u32,
    /// Per-user limit of the sale created for the run.
    #[arg(long, default_value_t = 1, env = "FLASHSALE_LOADTEST_PER_USER_LIMIT",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub per_user_limit: u32,
    /// Units per order.
    #[arg(long, default_value_t = 1, env = "FLASHSALE_LOADTEST_QUANTITY",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub quantity: u32,
    /// Distinct buyers, used in turn (default: a new buyer for every visit).
    #[arg(long, env = "FLASHSALE_LOADTEST_BUYERS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub buyers: Option<u64>,
    /// steady: orders per second across all users (goose's --throttle-requests).
    #[arg(long, default_value_t = 50, env = "FLASHSALE_LOADTEST_RATE",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// rush: a sale created for the run opens this long after it is created.
    #[arg(long, default_value = "2s", value_parser = duration, env = "FLASHSALE_LOADTEST_RUSH_DELAY")]
    pub rush_delay: Duration,
    /// retry-storm: deadline of each attempt.
    #[arg(long, default_value = "50ms", value_parser = duration, env = "FLASHSALE_LOADTEST_RETRY_TIMEOUT")]
    pub retry_timeout: Duration,
    /// retry-storm: attempts per Idempotency-Key before giving up (an error).
    #[arg(long, default_value_t = 20, env = "FLASHSALE_LOADTEST_MAX_ATTEMPTS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// retry-storm: share of accepted orders sent once more after their answer.
    #[arg(long, default_value_t = 0.1, value_parser = fraction, env = "FLASHSALE_LOADTEST_RESEND_RATE")]
    pub resend_rate: f64,
    /// browse-buy: pause between two polls of an order.
    #[arg(long, default_value = "250ms", value_parser = duration, env = "FLASHSALE_LOADTEST_POLL_INTERVAL")]
    pub poll_interval: Duration,
    /// browse-buy: an order not final this long after its 202 is an error.
    #[arg(long, default_value = "30s", value_parser = duration, env = "FLASHSALE_LOADTEST_POLL_DEADLINE")]
    pub poll_deadline: Duration,
    /// After the run, wait this long for every order to settle (0s: don't wait or check).
    #[arg(long, default_value = "60s", value_parser = duration, env = "FLASHSALE_LOADTEST_SETTLE_TIMEOUT")]
    pub settle_timeout: Duration,
    /// Largest share of requests with an unexpected answer before the run fails.
    #[arg(long, default_value_t = 0.01, value_parser = fraction, env = "FLASHSALE_LOADTEST_MAX_ERROR_RATE")]
    pub max_error_rate: f64,
    /// Other clients use the sale too: skip the check that the 202s match the accepted count.
    #[arg(long, env = "FLASHSALE_LOADTEST_SHARED_SALE")]
    pub shared_sale: bool,
    /// Where goose's reports and the checks go.
    #[arg(
        long,
        default_value = "target/loadtest",
        env = "FLASHSALE_LOADTEST_REPORT_DIR"
    )]
    pub report_dir: PathBuf,
    /// HMAC secret of buyer JWTs (the server's auth.jwt_secret).
    #[arg(long, default_value = DEV_JWT_SECRET, env = "FLASHSALE_AUTH__JWT_SECRET",
          hide_default_value = true, hide_env_values = true)]
    pub jwt_secret: String,
    /// JWT algorithm (HS256, HS384, HS512; the first of the server's auth.algorithms).
    #[arg(
        long,
        default_value = "HS256",
        env = "FLASHSALE_LOADTEST_JWT_ALGORITHM"
    )]
    pub jwt_algorithm: String,
    /// Required `iss` (the server's auth.issuer).
    #[arg(long, default_value = "flashsale", env = "FLASHSALE_AUTH__ISSUER")]
    pub issuer: String,
    /// Required `aud` (the server's auth.audience).
    #[arg(
        long,
        default_value = "flashsale-buyers",
        env = "FLASHSALE_AUTH__AUDIENCE"
    )]
    pub audience: String,
    /// Bearer token of the operator routes (the server's auth.operator_token).
    #[arg(long, default_value = DEV_OPERATOR_TOKEN, env = "FLASHSALE_AUTH__OPERATOR_TOKEN",
          hide_default_value = true, hide_env_values = true)]
    pub operator_token: String,
    /// Lifetime of the buyer tokens.
    #[arg(long, default_value = "1h", value_parser = duration, env = "FLASHSALE_LOADTEST_TOKEN_TTL")]
    pub token_ttl: Duration,
    /// payment_token of every order (`tok_visa` is paid by the mock provider).
    #[arg(
        long,
        default_value = "tok_visa",
        env = "FLASHSALE_LOADTEST_PAYMENT_TOKEN"
    )]
    pub payment_token: String,
    /// Goose's options, after `--`.
    #[arg(last = true, value_name = "GOOSE OPTIONS")]
    pub goose: Vec<String>,
}

impl Args {
    /// Refuses combinations that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.sale.is_none() && self.quantity > self.per_user_limit {
            return Err(format!(
                "--quantity {} is over --per-user-limit {}: every order would be refused",
                self.quantity, self.per_user_limit
            ));
        }
        if self.jwt_secret.len() < 16 {
            return Err("the JWT secret must be at least 16 bytes, as the server requires".into());
        }
        Ok(())
    }

    /// Parses goose's options (those after `--`). Help and errors print and exit, as goose
    /// does.
    pub fn goose_configuration(&self) -> GooseConfiguration {
        let argv = std::iter::once("loadtest --".to_string()).chain(self.goose.iter().cloned());
        <GooseConfiguration as Parser>::try_parse_from(argv).unwrap_or_else(|e| e.exit())
    }
}

fn given(goose_args: &[String], long: &str) -> bool {
    goose_args
        .iter()
        .any(|a| a == long || a.strip_prefix(long).is_some_and(|r| r.starts_with('=')))
}

/// Fills in what goose's command line left out: the host, 32 users started within a
/// second (rush: 1000 per second, as the users wait for the opening anyway), a 20 s run
/// and metrics kept from the first request (unless `--iterations` or `--test-plan` shape
/// the run), the rate cap of `steady`, and an HTML and a JSON report in the report
/// directory.
pub fn apply_goose_defaults(config: &mut GooseConfiguration, args: &Args) {
    let shaped = config.iterations.is_some() || given(&args.goose, "--test-plan");
    if config.host.is_none() {
        config.host = Some(args.host.clone());
    }
    if !given(&args.goose, "--test-plan") {
        if config.users.is_none() {
            config.users = Some(32);
        }
        if config.increase_rate.is_none() && config.increase_time.is_none() {
            let rate = match args.scenario {
                ScenarioKind::Rush => 1000,
                _ => config.users.unwrap_or(32).max(1),
            };
            config.increase_rate = Some(rate.to_string());
        }
    }
    if !shaped {
        if config.run_time.is_none() {
            config.run_time = Some("20s".into());
        }
        config.no_reset_metrics = true;
    }
    if args.scenario == ScenarioKind::Steady && config.throttle_requests.is_none() {
        config.throttle_requests = usize::try_from(args.rate).ok();
    }
    if config.report_file.is_empty() {
        for ext in ["html", "json"] {
            let file = args
                .report_dir
                .join(format!("{}.{ext}", args.scenario.name()));
            config.report_file.push(file.to_string_lossy().into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("loadtest").chain(cmd.iter().copied()))
            .expect("valid command line")
    }

    #[test]
    fn goose_options_after_the_separator_win_over_the_defaults() {
        let a = args(&[
            "--scenario",
            "steady",
            "--rate",
            "70",
            "--",
            "-u",
            "5",
            "-t",
            "3s",
        ]);
        let mut c = a.goose_configuration();
        apply_goose_defaults(&mut c, &a);
        assert_eq!(c.users, Some(5));
        assert_eq!(c.run_time.as_deref(), Some("3s"));
        assert_eq!(c.increase_rate.as_deref(), Some("5"));
        assert_eq!(c.throttle_requests, Some(70));
        assert_eq!(c.host.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(
            c.report_file,
            vec!["target/loadtest/steady.html", "target/loadtest/steady.json"]
        );
        assert!(c.no_reset_metrics);
    }

    #[test]
    fn iterations_leave_the_run_time_to_goose() {
        let a = args(&["--", "--iterations", "1", "--report-file", "r.json"]);
        let mut c = a.goose_configuration();
        apply_goose_defaults(&mut c, &a);
        assert_eq!(a.scenario, ScenarioKind::Rush);
        assert_eq!(c.run_time, None);
        assert!(!c.no_reset_metrics);
        assert_eq!(c.increase_rate.as_deref(), Some("1000"));
        assert_eq!(c.throttle_requests, None);
        assert_eq!(c.report_file, vec!["r.json"]);
    }

    #[test]
    fn a_quantity_over_the_limit_is_refused() {
        assert!(args(&["--quantity", "2"]).validate().is_err());
        assert!(args(&["--quantity", "2", "--per-user-limit", "2"])
            .validate()
            .is_ok());
        assert!(args(&["--scenario", "retry-storm"]).validate().is_ok());
    }
}
