//! `loadtest`: a goose load test of a running flashsale endpoint. See the crate docs
//! (`loadtest/src/lib.rs`) or `loadtest --help`.

use anyhow::{anyhow, Context};
use clap::Parser;
use goose::client::GooseClientBuilder;
use goose::config::GooseConfiguration;
use goose::{GooseAttack, GooseError};
use loadtest::cli::{apply_goose_defaults, Args, ScenarioKind};
use loadtest::invariants::{check_all, passed, render, Expectations};
use loadtest::scenarios::{scenario, Ctx};
use loadtest::setup::Api;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    let mut config = args.goose_configuration();
    apply_goose_defaults(&mut config, &args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args, config)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("lt{ms:x}{:04x}", rand::random::<u16>())
}

async fn run(args: Args, config: GooseConfiguration) -> anyhow::Result<bool> {
    let host = config.host.clone().unwrap_or_else(|| args.host.clone());
    let api = Api::new(&host, &config, &args.operator_token)?;
    let (sale, before) = match &args.sale {
        Some(id) => {
            let sale = api.sale(id).await?;
            let before = api.stats(id).await?;
            (sale, Some(before))
        }
        None => {
            let starts_at = (args.scenario == ScenarioKind::Rush)
                .then(|| OffsetDateTime::now_utc() + args.rush_delay);
            let sale = api
                .create_sale(args.stock, args.per_user_limit, starts_at)
                .await?;
            (sale, None)
        }
    };
    let opens_at = (args.scenario == ScenarioKind::Rush).then(|| {
        let wait =
            Duration::try_from(sale.starts_at - OffsetDateTime::now_utc()).unwrap_or_default();
        // A few milliseconds late rather than early: the server's clock decides.
        tokio::time::Instant::now() + wait + Duration::from_millis(5)
    });
    if u64::from(args.quantity) > sale.per_user_limit {
        eprintln!(
            "loadtest: warning: --quantity {} is over the sale's per-user limit {}",
            args.quantity, sale.per_user_limit
        );
    }
    for file in &config.report_file {
        if let Some(dir) = Path::new(file)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(&args.report_dir)
        .with_context(|| format!("creating {}", args.report_dir.display()))?;
    let run = run_id();
    println!(
        "loadtest {}: {host}, sale {} (stock {}, opens {}), buyers {run}-b*",
        args.scenario.name(),
        sale.id,
        sale.stock,
        sale.starts_at
    );
    let reports = config.report_file.clone();
    let ctx = Arc::new(Ctx::new(&args, &sale, opens_at, run.clone())?);

    let attack = GooseAttack::initialize_with_config(config)
        .and_then(|a| {
            a.set_client_builder_without_cookies(GooseClientBuilder::new().without_cookies())
        })
        .map_err(|e| anyhow!("goose: {e}"))?
        .register_scenario(scenario(&ctx));
    let goose_ok = match attack.execute().await {
        Ok(_) => true,
        Err(GooseError::ThresholdsFailed { .. }) => {
            eprintln!("loadtest: a goose threshold failed");
            false
        }
        Err(e) => return Err(anyhow!("goose: {e}")),
    };

    let (after, settled) = if args.settle_timeout.is_zero() {
        (api.stats(&sale.id).await?, None)
    } else {
        println!(
            "\nwaiting up to {} for sale {} to settle",
            humantime::format_duration(args.settle_timeout),
            sale.id
        );
        let started = std::time::Instant::now();
        let (stats, ok) = api.wait_settled(&sale.id, args.settle_timeout).await?;
        println!(
            "{} after {:.1} s",
            if ok { "settled" } else { "not settled" },
            started.elapsed().as_secs_f64()
        );
        (stats, Some(ok))
    };
    let seen = ctx.observed.summary();
    let checks = check_all(
        &after,
        before.as_ref(),
        &seen,
        &Expectations {
            exclusive: !args.shared_sale,
            max_error_rate: args.max_error_rate,
            settled,
        },
    );

    println!(
        "\noutcomes ({} requests, {} unexpected)",
        seen.requests, seen.errors
    );
    for (k, v) in &seen.outcomes {
        println!("  {v:>9}  {k}");
    }
    println!(
        "\nsale {}: stock {}, stock_left {}, accepted {} ({} units), released {} ({} units), paid {}, payment_failed {}, expired {}",
        sale.id,
        after.stock,
        after.stock_left,
        after.accepted,
        after.accepted_units,
        after.released,
        after.released_units,
        after.paid,
        after.payment_failed,
        after.expired
    );
    println!("\ninvariants\n{}", render(&checks));
    let ok = passed(&checks) && goose_ok;
    let file = args
        .report_dir
        .join(format!("{}-checks.json", args.scenario.name()));
    let doc = serde_json::json!({
        "scenario": args.scenario.name(),
        "host": host,
        "sale_id": sale.id,
        "run_id": run,
        "passed": ok,
        "stats_before": before,
        "stats_after": after,
        "observed": seen,
        "checks": checks,
        "goose_reports": reports,
    });
    std::fs::write(&file, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", file.display()))?;
    println!("reports: {} and {}", reports.join(", "), file.display());
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
