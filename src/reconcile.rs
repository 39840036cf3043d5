//! `flashsale reconcile`: rebuilds the admission counters a sale should have from the order
//! store, compares them with what the admission backend holds, and repairs on request.
//!
//! The store is the record of every settled order, so reconcile is exact once the settler
//! has caught up with the log (after a Redis restart ingest answers 503 for the sale, so
//! no new order arrives while the settler drains the log). Token buckets start full;
//! rejection counters are kept.

use crate::config::{Config, EMBEDDED};
use anyhow::Context;
use ingest::admission::Admission;
use ingest::api::fingerprint;
use ingest::model::{OrderRef, SaleRules, SaleState, Snapshot};
use ingest::redis_admission::RedisAdmission;
use std::fmt::Write;
use storage::sqlite::SqliteStore;
use storage::{Order, OrderStore, Sale, SaleId};

/// What reconcile found for one sale.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The sale.
    pub sale: SaleId,
    /// Differences between the backend and the store, in words; empty if none.
    pub differences: Vec<String>,
    /// Whether the backend's keys were rewritten.
    pub repaired: bool,
}

/// The counters a sale's orders imply.
pub fn expected_state(sale: &Sale, orders: &[Order]) -> Snapshot {
    let mut state = SaleState::new(SaleRules::of(sale));
    let oref = |o: &Order| OrderRef {
        order_id: o.new.order_id,
        user: o.new.user_id.clone(),
        quantity: o.new.quantity,
        key: o.new.idempotency_key.clone(),
    };
    for o in orders {
        state.restore_accepted(
            &oref(o),
            &fingerprint(o.new.quantity, &o.new.payment_token),
            o.new.sequence,
        );
    }
    for o in orders
        .iter()
        .filter(|o| o.released_at.is_some() || o.status.releases_stock())
    {
        state.release(&oref(o));
    }
    state.snapshot()
}

/// Reconciles `sale` (or every sale) of the store in `config.data_dir` against the
/// configured admission backend; repairs when `repair` is set or the sale's keys are
/// missing.
pub async fn run(
    config: &Config,
    sale: Option<&str>,
    repair: bool,
) -> anyhow::Result<Vec<Finding>> {
    anyhow::ensure!(
        config.admission.url != EMBEDDED,
        "admission.url = \"embedded\": the embedded counters are rebuilt from the log and \
         the store at every start; reconcile applies to redis://"
    );
    anyhow::ensure!(
        config.store.url == EMBEDDED,
        "store.url = {:?}: only the embedded store exists in this build",
        config.store.url
    );
    let store = SqliteStore::open(config.data_dir.join("flashsale.db"))
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let redis = RedisAdmission::connect(
        &config.admission.url,
        &config.admission.key_prefix,
        config
            .admission
            .decision_timeout
            .max(std::time::Duration::from_secs(2)),
    )
    .await
    .with_context(|| format!("admission.url: cannot use {}", config.admission.url))?;
    let sales = match sale {
        Some(id) => {
            let id = SaleId::parse(id).map_err(|e| anyhow::anyhow!("--sale: {e}"))?;
            vec![store
                .get_sale(&id)
                .await?
                .with_context(|| format!("--sale {id}: no such sale in the store"))?]
        }
        None => store.list_sales().await?,
    };
    let mut findings = Vec::new();
    for sale in sales {
        let orders = store.orders_of_sale(&sale.id).await?;
        let want = expected_state(&sale, &orders);
        let mut differences = Vec::new();
        match redis.counters(&sale.id).await? {
            None => differences.push("the sale's keys are missing from Redis".to_owned()),
            Some(have) => {
                let w = &want.counters;
                for (name, have, want) in [
                    ("stock", have.stock as i64, w.stock as i64),
                    ("stock_left", have.stock_left, w.stock_left),
                    (
                        "accepted_orders",
                        have.accepted_orders as i64,
                        w.accepted_orders as i64,
                    ),
                    (
                        "accepted_units",
                        have.accepted_units as i64,
                        w.accepted_units as i64,
                    ),
                    (
                        "released_units",
                        have.released_units as i64,
                        w.released_units as i64,
                    ),
                ] {
                    if have != want {
                        differences.push(format!("{name}: Redis {have}, store {want}"));
                    }
                }
                let units = redis.all_units(&sale.id).await?;
                if units != want.units {
                    differences.push(format!(
                        "units per user differ ({} users in Redis, {} in the store)",
                        units.len(),
                        want.units.len()
                    ));
                }
            }
        }
        let missing = differences.iter().any(|d| d.contains("missing"));
        let repaired = !differences.is_empty() && (repair || missing);
        if repaired {
            redis.restore(&sale, &want).await?;
        }
        findings.push(Finding {
            sale: sale.id.clone(),
            differences,
            repaired,
        });
    }
    Ok(findings)
}

/// The findings as a person reads them.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        if f.differences.is_empty() {
            let _ = writeln!(s, "sale {}: consistent", f.sale);
            continue;
        }
        let _ = writeln!(s, "sale {}: {} difference(s)", f.sale, f.differences.len());
        for d in &f.differences {
            let _ = writeln!(s, "  - {d}");
        }
        let _ = writeln!(
            s,
            "  {}",
            if f.repaired {
                "repaired: Redis now holds the counters the store implies"
            } else {
                "not repaired (run with --repair)"
            }
        );
    }
    s
}
