//! `flashsale receipt ORDER_ID -o FILE`: writes an order's PDF document (its receipt, or the
//! refund note of a refunded late charge) from the archive `[receipts]` names to a file.

use crate::config::Config;
use anyhow::{bail, Context};
use std::path::Path;
use storage::OrderId;

/// Exit code when the order is unknown or has no document yet.
pub const NO_DOCUMENT: i32 = 1;

/// Looks `order_id` up in the store, reads its document from the archive and writes it to
/// `out`. Returns the exit code: 0 once written, [`NO_DOCUMENT`] (with a line on stderr)
/// when the order is unknown or has no document yet; fails when a backend does.
pub async fn run(config: &Config, order_id: &str, out: &Path) -> anyhow::Result<i32> {
    let id: OrderId = order_id
        .parse()
        .map_err(|_| anyhow::anyhow!("{order_id:?} is not an order id (a UUID)"))?;
    if !config.receipts.enabled {
        bail!("receipts.enabled = false: no receipts are kept");
    }
    let store = crate::app::open_store(config).await?;
    let Some(order) = store.get_order(id).await? else {
        eprintln!("order {id}: no such order in the store");
        return Ok(NO_DOCUMENT);
    };
    let Some(key) = order.refund_note_key.or(order.receipt_key) else {
        eprintln!(
            "order {id} ({}): no receipt yet (one is written once the order is paid)",
            order.status
        );
        return Ok(NO_DOCUMENT);
    };
    let archive = crate::app::open_archive(config)
        .await?
        .context("receipts are disabled")?;
    let Some(bytes) = archive
        .get(&key)
        .await
        .with_context(|| format!("reading {key} from the receipts archive"))?
    else {
        eprintln!("order {id}: its document {key} is missing from the archive (run reconcile)");
        return Ok(NO_DOCUMENT);
    };
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "order {id}: wrote {} ({} bytes)",
        out.display(),
        bytes.len()
    );
    Ok(0)
}
