//! `flashsale reconcile`: checks the invariants of the architecture across Redis, the log
//! and the store, rebuilds the admission counters a sale should have from the order store,
//! and repairs them on request.
//!
//! Checked per sale: the counters Redis holds against those the store implies (accepted
//! vs persisted, units per user, conservation of stock: `stock = left + accepted - released`
//! on both sides); releases exactly once (every failed or expired order released, and no
//! paid or unsettled order among Redis's released ids); one charge per order (every paid
//! order has a charge id of its own; with `--payment-url` of a provider that keeps an
//! audit, like `flashsale mock-provider`: at most one successful charge per order, exactly
//! one per paid order, none kept for a released one); and, with a Kafka log, that the
//! settler has persisted everything the log holds (otherwise the counters cannot be
//! compared yet, and nothing is repaired). With `[receipts]` enabled: one receipt per paid
//! order (every receipt key an order records names an object under `receipts/`, listed
//! once) and none for an order that is not paid. A paid order that records no key yet is
//! *pending* (the settler's receipts stage writes it off the order path): reported, not
//! broken. When none of a sale's recorded receipts is in the archive, the finding names
//! the archive reconcile opened (most likely not the one the settler writes to).
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
use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use storage::{Order, OrderId, OrderStatus, OrderStore, RefundState, Sale, SaleId};

/// What reconcile found for one sale.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The sale.
    pub sale: SaleId,
    /// Differences between the admission counters and the store, in words; a repair
    /// rewrites the counters from the store. Empty if none.
    pub differences: Vec<String>,
    /// Broken invariants no counter rewrite fixes (a paid order whose stock went back, a
    /// second charge, a release still owed, a settler behind the log), in words.
    pub broken: Vec<String>,
    /// Work the settler still has to do that breaks nothing (receipts not written yet),
    /// in words.
    pub pending: Vec<String>,
    /// Whether the backend's keys were rewritten.
    pub repaired: bool,
}

impl Finding {
    /// Whether an invariant is left broken (reconcile exits non-zero).
    pub fn is_broken(&self) -> bool {
        !self.broken.is_empty() || (!self.differences.is_empty() && !self.repaired)
    }
}

/// The counters a sale's orders imply.
pub fn expected_state(sale: &Sale, orders: &[Order]) -> Snapshot {
    let mut state = SaleState::new(SaleRules::of(sale));
    for o in orders {
        state.restore_accepted(
            &OrderRef::from(o),
            &fingerprint(o.new.quantity, &o.new.payment_token),
            o.new.sequence,
        );
    }
    for o in orders
        .iter()
        .filter(|o| o.released_at.is_some() || o.status.releases_stock())
    {
        state.release(&OrderRef::from(o));
    }
    state.snapshot()
}

/// Reconciles `sale` (or every sale) of the configured store against the configured
/// admission backend; repairs the counters when `repair` is set or the sale's keys are
/// missing, unless the settler is behind the log. `audit_url`: a payment provider whose
/// `GET /v1/audit` lists the charges per order.
pub async fn run(
    config: &Config,
    sale: Option<&str>,
    repair: bool,
    audit_url: Option<&str>,
) -> anyhow::Result<Vec<Finding>> {
    anyhow::ensure!(
        config.admission.url != EMBEDDED,
        "admission.url = \"embedded\": the embedded counters are rebuilt from the log and \
         the store at every start; reconcile applies to redis://"
    );
    let store = crate::app::open_store(config).await?;
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
    let lag = log_lag(config, store.as_ref()).await?;
    let audit = match audit_url {
        Some(url) => Some(
            mock_provider::fetch_audit(url)
                .await
                .with_context(|| format!("--payment-url {url}: no audit"))?,
        ),
        None => None,
    };
    // Listed once, compared per sale.
    let receipt_objects = match crate::app::open_archive(config).await? {
        Some(archive) => Some((
            receipt_ids(
                &archive
                    .keys(receipts::Kind::Receipt.key_prefix())
                    .await
                    .context("listing the receipts in the archive")?,
            ),
            config.receipts.archive_config(&config.data_dir)?.url,
        )),
        None => None,
    };
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
        let counted = admitted(store.as_ref(), &orders).await?;
        let want = expected_state(&sale, &counted);
        let mut differences = Vec::new();
        let mut broken = Vec::new();
        if let Some(lag) = &lag {
            broken.push(lag.clone());
        }
        let mut pending = Vec::new();
        // Transfers between stock buckets a dead caller left half-done: completed first
        // (each is received once whatever happens), so the counters compare.
        if sale.stock_buckets > 1 {
            match redis.complete_transfers(&sale.id).await {
                Ok(0) | Err(_) => {}
                Ok(n) => pending.push(format!(
                    "completed {n} transfer(s) of units between stock buckets left half-done"
                )),
            }
        }
        match redis.counters(&sale.id).await? {
            None => differences.push("the sale's keys are missing from Redis".to_owned()),
            Some(have) => {
                let w = &want.counters;
                let held = have.accepted_units as i64 - have.released_units as i64;
                if have.stock as i64 != have.stock_left + held {
                    differences.push(format!(
                        "conservation in Redis: stock {} != left {} + accepted {} - released {}",
                        have.stock, have.stock_left, have.accepted_units, have.released_units
                    ));
                }
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
                let released: HashSet<OrderId> =
                    redis.released(&sale.id).await?.into_iter().collect();
                check_releases(&orders, &released, &mut broken);
            }
        }
        check_charges(&orders, audit.as_ref(), &mut broken);
        check_refunds(&orders, &mut broken);
        if let Some((objects, url)) = &receipt_objects {
            compare_receipts(&orders, objects).report(url, &mut broken, &mut pending);
        }
        let missing = differences.iter().any(|d| d.contains("missing"));
        // Behind the log, the store does not hold every accepted order yet: rewriting the
        // counters from it would hand out stock that is sold.
        let repaired = !differences.is_empty() && (repair || missing) && lag.is_none();
        if repaired {
            redis.restore(&sale, &want).await?;
        }
        findings.push(Finding {
            sale: sale.id.clone(),
            differences,
            broken,
            pending,
            repaired,
        });
    }
    Ok(findings)
}

/// The orders admission still counts as accepted: all but those cancelled because ingest
/// aborted their admission before the record landed (`persisted -> expired` without a
/// charge attempt; admission took their acceptance back instead of releasing them).
async fn admitted(store: &dyn OrderStore, orders: &[Order]) -> anyhow::Result<Vec<Order>> {
    let mut out = Vec::with_capacity(orders.len());
    for o in orders {
        if o.status == OrderStatus::Expired {
            let full = store.get_order(o.new.order_id).await?;
            let charged = full.is_some_and(|f| {
                f.history
                    .iter()
                    .any(|h| h.status == OrderStatus::PaymentPending)
            });
            if !charged {
                continue;
            }
        }
        out.push(o.clone());
    }
    Ok(out)
}

/// Releases exactly once: every failed or expired order released, none other released.
fn check_releases(orders: &[Order], released: &HashSet<OrderId>, broken: &mut Vec<String>) {
    for o in orders {
        let id = o.new.order_id;
        if o.status.releases_stock() {
            if o.released_at.is_none() || !released.contains(&id) {
                broken.push(format!(
                    "order {id} is {} but its stock was not given back yet",
                    o.status
                ));
            }
        } else if released.contains(&id) {
            broken.push(format!(
                "order {id} is {} but Redis gave its stock back",
                o.status
            ));
        }
    }
}

/// Refunds of late charges the settler has not finished: owed (the sweep is still
/// retrying) or refused by the provider (an operator must settle it).
fn check_refunds(orders: &[Order], broken: &mut Vec<String>) {
    for o in orders {
        let id = o.new.order_id;
        let charge = o.charge_id.as_deref().unwrap_or("?");
        match o.refund {
            Some(RefundState::Owed) => broken.push(format!(
                "order {id} is {} and still owes the refund of its late charge {charge}",
                o.status
            )),
            Some(RefundState::Refused) => broken.push(format!(
                "order {id} is {}; the provider refused to refund its late charge {charge}: \
                 an operator must settle it",
                o.status
            )),
            Some(RefundState::Refunded) | None => {}
        }
    }
}

/// The order ids of the receipt objects `keys` name (`receipts/{xx}/{order_id}.pdf`);
/// keys of another shape are ignored.
pub fn receipt_ids(keys: &[String]) -> HashSet<OrderId> {
    keys.iter()
        .filter_map(|k| {
            let name = k.rsplit('/').next()?.strip_suffix(".pdf")?;
            name.parse().ok()
        })
        .collect()
}

/// How a sale's receipts compare with its paid orders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptCheck {
    /// Paid orders that record a receipt key whose object the archive does not hold.
    pub lost: Vec<OrderId>,
    /// Receipt keys the sale's orders record (paid or not).
    pub recorded: usize,
    /// Paid orders that record no receipt key yet (the receipts stage has not got to them).
    pub owed: Vec<OrderId>,
    /// Orders that are not paid but have a receipt object.
    pub extra: Vec<OrderId>,
}

/// How many ids a finding names before "and N more".
const FIRST_FEW: usize = 5;

/// The first few of `ids`, then "and N more".
fn first_few(ids: &[OrderId]) -> String {
    let mut s: Vec<String> = ids
        .iter()
        .take(FIRST_FEW)
        .map(ToString::to_string)
        .collect();
    if ids.len() > FIRST_FEW {
        s.push(format!("and {} more", ids.len() - FIRST_FEW));
    }
    s.join(", ")
}

impl ReceiptCheck {
    /// The broken invariants and the pending work, in words (counts and the first few
    /// ids); `archive` names the archive that was listed.
    pub fn report(&self, archive: &str, broken: &mut Vec<String>, pending: &mut Vec<String>) {
        if !self.lost.is_empty() && self.lost.len() == self.recorded {
            broken.push(format!(
                "receipts: none of the {} receipt(s) this sale's orders record is in the \
                 archive {archive}; is receipts.url the archive the settler writes to?",
                self.recorded
            ));
        } else if !self.lost.is_empty() {
            broken.push(format!(
                "receipts: {} paid order(s) record a receipt the archive does not hold: {}",
                self.lost.len(),
                first_few(&self.lost)
            ));
        }
        if !self.extra.is_empty() {
            broken.push(format!(
                "receipts: {} receipt(s) of orders that are not paid: {}",
                self.extra.len(),
                first_few(&self.extra)
            ));
        }
        if !self.owed.is_empty() {
            pending.push(format!(
                "receipts: {} paid order(s) wait for their receipt (the settler's receipts \
                 stage writes them): {}",
                self.owed.len(),
                first_few(&self.owed)
            ));
        }
    }
}

/// One receipt per paid order: every recorded receipt key names an object the archive
/// holds; a paid order without a key yet is owed; no receipt object for an order that is
/// not paid.
pub fn compare_receipts(orders: &[Order], objects: &HashSet<OrderId>) -> ReceiptCheck {
    let mut check = ReceiptCheck::default();
    for o in orders {
        let id = o.new.order_id;
        check.recorded += usize::from(o.receipt_key.is_some());
        if o.status == OrderStatus::Paid {
            if o.receipt_key.is_none() {
                check.owed.push(id);
            } else if !objects.contains(&id) {
                check.lost.push(id);
            }
        } else if objects.contains(&id) {
            check.extra.push(id);
        }
    }
    check
}

/// One charge per order, from the store and, when given, the provider's audit.
fn check_charges(orders: &[Order], audit: Option<&mock_provider::Audit>, broken: &mut Vec<String>) {
    let mut charge_ids: HashMap<&str, OrderId> = HashMap::new();
    for o in orders {
        let id = o.new.order_id;
        match (&o.charge_id, o.status) {
            (None, OrderStatus::Paid) => broken.push(format!("paid order {id} has no charge id")),
            (Some(c), _) => {
                if let Some(other) = charge_ids.insert(c.as_str(), id) {
                    broken.push(format!("orders {other} and {id} share charge {c}"));
                }
            }
            _ => {}
        }
        let Some(audit) = audit else { continue };
        let seen = audit.orders.get(&id.to_string());
        let (ok, refunds) = seen.map_or((0, 0), |a| (a.successful_charges, a.refunds));
        let wrong = match o.status {
            OrderStatus::Paid => ok != 1 || refunds != 0,
            s if s.releases_stock() => ok > refunds,
            _ => ok > 1,
        };
        if wrong {
            broken.push(format!(
                "order {id} is {}: the provider holds {ok} successful charge(s) and {refunds} refund(s)",
                o.status
            ));
        }
    }
}

/// With a Kafka log: records the settler has not persisted yet, in words; `None` when it
/// has caught up (or the log is embedded, which the serving process owns).
async fn log_lag(config: &Config, store: &dyn OrderStore) -> anyhow::Result<Option<String>> {
    #[cfg(feature = "kafka")]
    if let Some(kafka) = config.log.kafka() {
        let log = sequencer::kafka::KafkaLog::new(&kafka)?;
        let mut behind = 0u64;
        for (partition, end) in log.end_offsets(&kafka.orders_topic()).await? {
            let done = store
                .checkpoint(&config.settler.consumer, partition)
                .await?
                .unwrap_or(0);
            behind += end.saturating_sub(done);
        }
        return Ok((behind > 0).then(|| {
            format!(
                "the settler has not persisted {behind} record(s) of the log yet; \
                 counters not compared (run again once it caught up)"
            )
        }));
    }
    let _ = (config, store);
    Ok(None)
}

/// The findings as a person reads them.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        if f.differences.is_empty() && f.broken.is_empty() {
            let _ = writeln!(s, "sale {}: consistent", f.sale);
            for p in &f.pending {
                let _ = writeln!(s, "  ~ pending: {p}");
            }
            continue;
        }
        let _ = writeln!(
            s,
            "sale {}: {} difference(s), {} broken invariant(s)",
            f.sale,
            f.differences.len(),
            f.broken.len()
        );
        for d in f.broken.iter().take(20) {
            let _ = writeln!(s, "  ! {d}");
        }
        if f.broken.len() > 20 {
            let _ = writeln!(s, "  ! ... and {} more", f.broken.len() - 20);
        }
        for d in &f.differences {
            let _ = writeln!(s, "  - {d}");
        }
        for p in &f.pending {
            let _ = writeln!(s, "  ~ pending: {p}");
        }
        if f.differences.is_empty() {
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{Currency, Money, NewOrder, Timestamp, UserId};

    fn order(status: OrderStatus, refund: Option<RefundState>) -> Order {
        Order {
            new: NewOrder {
                order_id: OrderId::new(),
                sale_id: SaleId::parse("s").expect("sale"),
                user_id: UserId::parse("u").expect("user"),
                quantity: 1,
                amount: Money {
                    minor: 100,
                    currency: Currency::parse("EUR").expect("eur"),
                },
                sequence: 1,
                idempotency_key: "k".into(),
                payment_token: "tok".into(),
                accepted_at: Timestamp::now(),
            },
            status,
            history: Vec::new(),
            charge_id: refund.map(|_| "ch_late".into()),
            released_at: Some(Timestamp::now()),
            notified_at: Some(Timestamp::now()),
            refund,
            failed_attempts: 0,
            retry_after: None,
            receipt_key: None,
            refund_note_key: None,
        }
    }

    #[test]
    fn one_receipt_per_paid_order() {
        let with_key = |status| {
            let mut o = order(status, None);
            o.receipt_key = Some(receipts::object_key(
                o.new.order_id,
                receipts::Kind::Receipt,
            ));
            o
        };
        let orders = [
            with_key(OrderStatus::Paid),             // fine
            order(OrderStatus::Paid, None),          // no key recorded, object there: owed
            with_key(OrderStatus::Paid),             // key recorded, no object: lost
            order(OrderStatus::Expired, None),       // object of an order not paid: extra
            order(OrderStatus::PaymentFailed, None), // nothing: fine
        ];
        let keys: Vec<String> = [0, 1, 3]
            .iter()
            .map(|&i| receipts::object_key(orders[i].new.order_id, receipts::Kind::Receipt))
            .chain([
                "receipts/zz/not-an-order.pdf".to_owned(),
                "other".to_owned(),
            ])
            .collect();
        let objects = receipt_ids(&keys);
        assert_eq!(objects.len(), 3);
        let check = compare_receipts(&orders, &objects);
        assert_eq!(check.owed, vec![orders[1].new.order_id]);
        assert_eq!(check.lost, vec![orders[2].new.order_id]);
        assert_eq!(check.extra, vec![orders[3].new.order_id]);
        let (mut broken, mut pending) = (Vec::new(), Vec::new());
        check.report("file:///r", &mut broken, &mut pending);
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(
            broken[0].starts_with("receipts: 1 paid order(s) record a receipt the archive"),
            "{}",
            broken[0]
        );
        assert!(broken[0].contains(&orders[2].new.order_id.to_string()));
        assert!(broken[1].contains(&orders[3].new.order_id.to_string()));
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].contains(&orders[1].new.order_id.to_string()));

        // All well: nothing reported.
        let fine = [with_key(OrderStatus::Paid)];
        let objects = receipt_ids(&[receipts::object_key(
            fine[0].new.order_id,
            receipts::Kind::Receipt,
        )]);
        let (mut broken, mut pending) = (Vec::new(), Vec::new());
        compare_receipts(&fine, &objects).report("file:///r", &mut broken, &mut pending);
        assert!(broken.is_empty() && pending.is_empty(), "{broken:?}");

        // Owed only: pending, nothing broken; many: the first few ids, then a count.
        let many: Vec<Order> = (0..8).map(|_| order(OrderStatus::Paid, None)).collect();
        let (mut broken, mut pending) = (Vec::new(), Vec::new());
        compare_receipts(&many, &HashSet::new()).report("file:///r", &mut broken, &mut pending);
        assert!(broken.is_empty(), "{broken:?}");
        assert!(pending[0].ends_with("and 3 more"), "{}", pending[0]);

        // Every recorded receipt absent: another archive, named.
        let elsewhere: Vec<Order> = (0..3).map(|_| with_key(OrderStatus::Paid)).collect();
        let (mut broken, mut pending) = (Vec::new(), Vec::new());
        compare_receipts(&elsewhere, &objects).report("s3://other", &mut broken, &mut pending);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(
            broken[0].contains("none of the 3") && broken[0].contains("s3://other"),
            "{}",
            broken[0]
        );
    }

    #[test]
    fn refunds_owed_or_refused_are_broken_invariants() {
        let orders = [
            order(OrderStatus::Expired, None),
            order(OrderStatus::Expired, Some(RefundState::Refunded)),
            order(OrderStatus::Expired, Some(RefundState::Owed)),
            order(OrderStatus::PaymentFailed, Some(RefundState::Refused)),
        ];
        let mut broken = Vec::new();
        check_refunds(&orders, &mut broken);
        assert_eq!(broken.len(), 2, "{broken:?}");
        let owed = orders[2].new.order_id.to_string();
        let refused = orders[3].new.order_id.to_string();
        assert!(broken[0].contains(&owed) && broken[0].contains("owes the refund"));
        assert!(broken[1].contains(&refused) && broken[1].contains("refused"));
        assert!(broken.iter().all(|b| b.contains("ch_late")));
    }
}
