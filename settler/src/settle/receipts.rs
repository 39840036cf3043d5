//! The receipts stage: writes the document each settled order is owed (a receipt for a
//! paid order, a refund note for a refunded late charge) to the archive, off the order
//! path.
//!
//! Every `receipts_interval` (and soon after a status change) it reads up to
//! `receipts_batch` orders owed a document ([`OrderStore::documents_owed`], oldest first),
//! reads each with its history, renders its PDF and writes it create-if-absent under
//! [`receipts::object_key`]. A key already there counts as stored: the bytes are the same
//! every time, so a replay (a crash between the write and its record, another settler)
//! finds its own document. The keys stored are then recorded in one
//! [`OrderStore::apply_batch`] of [`Change::Document`]; until then the order stays owed,
//! so nothing is lost to a crash or an outage.
//!
//! An archive or store failure (an outage, refused credentials) is logged once per
//! streak, and the stage backs off (the interval doubling up to [`MAX_BACKOFF`]); the
//! other stages never wait for it, so settlement goes on while the archive is down. An
//! order that cannot be documented (no `paid` entry in its history, its sale gone) is
//! logged and skipped until the settler restarts (a bounded set of ids), so it cannot
//! hold up the orders behind it.
//!
//! [`OrderStore::documents_owed`]: storage::OrderStore::documents_owed
//! [`OrderStore::apply_batch`]: storage::OrderStore::apply_batch

use super::core::Core;
use super::stats::SettlerStats;
use super::{pause, Documents};
use crate::metrics::{metrics, Event};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use storage::{Change, DocumentKind, Order, OrderId, Sale, SaleId};
use tokio_util::sync::CancellationToken;

/// Longest wait between two attempts while the archive (or the store) fails.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Most order ids remembered as not documentable; the oldest is forgotten first.
const SKIPPED_MAX: usize = 10_000;
/// Most sales kept in the stage's cache (cleared when full).
const SALES_MAX: usize = 64;

/// The stage's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiptSettings {
    pub(crate) interval: Duration,
    pub(crate) batch: usize,
}

/// Why a pass stopped early: the order stays owed and is tried again.
#[derive(Debug)]
enum PassError {
    Archive(receipts::ArchiveError),
    Store(String),
}

impl std::fmt::Display for PassError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassError::Archive(e) => write!(f, "{e}"),
            PassError::Store(e) => write!(f, "store: {e}"),
        }
    }
}

fn store_error(e: &storage::Error) -> PassError {
    PassError::Store(storage::ErrorChain(e).to_string())
}

/// Order ids not to try again, at most [`SKIPPED_MAX`].
#[derive(Default)]
struct Skipped {
    ids: HashSet<OrderId>,
    order: VecDeque<OrderId>,
}

impl Skipped {
    fn contains(&self, id: &OrderId) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: OrderId) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > SKIPPED_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

struct ReceiptStage {
    core: Arc<Core>,
    documents: Documents,
    batch: usize,
    sales: HashMap<SaleId, Sale>,
    skipped: Skipped,
}

fn kind_of(kind: receipts::Kind) -> DocumentKind {
    match kind {
        receipts::Kind::Receipt => DocumentKind::Receipt,
        receipts::Kind::RefundNote => DocumentKind::RefundNote,
    }
}

impl ReceiptStage {
    async fn sale(&mut self, id: &SaleId) -> Result<Option<Sale>, PassError> {
        if let Some(sale) = self.sales.get(id) {
            return Ok(Some(sale.clone()));
        }
        let Some(sale) = self
            .core
            .store
            .get_sale(id)
            .await
            .map_err(|e| store_error(&e))?
        else {
            return Ok(None);
        };
        if self.sales.len() >= SALES_MAX {
            self.sales.clear();
        }
        self.sales.insert(id.clone(), sale.clone());
        Ok(Some(sale))
    }

    /// The document `listed` is owed, rendered: `None` (and the order skipped from now
    /// on) if it cannot be documented or is no longer owed one.
    async fn render(
        &mut self,
        listed: &Order,
    ) -> Result<Option<(receipts::Kind, Vec<u8>)>, PassError> {
        let id = listed.new.order_id;
        // The listing may come without history: the document needs it.
        let Some(order) = self
            .core
            .store
            .get_order(id)
            .await
            .map_err(|e| store_error(&e))?
        else {
            tracing::error!(order_id = %id, "receipts: an order owed a document is gone; skipped");
            self.skipped.insert(id);
            return Ok(None);
        };
        if order.document_owed().is_none() {
            // Recorded meanwhile (another settler).
            return Ok(None);
        }
        let Some(sale) = self.sale(&order.new.sale_id).await? else {
            tracing::error!(order_id = %id, sale_id = %order.new.sale_id, "receipts: the order's sale is gone; no document, skipped");
            self.skipped.insert(id);
            return Ok(None);
        };
        let document = match receipts::Document::for_order(&order, &sale, &self.documents.seller) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(order_id = %id, error = %e, "receipts: the order cannot be documented; skipped");
                self.skipped.insert(id);
                return Ok(None);
            }
        };
        let kind = document.kind;
        // Laying out a page takes a little CPU: off the stages' threads.
        let bytes = tokio::task::spawn_blocking(move || receipts::render(&document))
            .await
            .map_err(|e| PassError::Store(format!("rendering a document failed: {e}")))?;
        Ok(Some((kind, bytes)))
    }

    /// One pass: documents up to `batch` owed orders. `Ok(true)` if the batch was full
    /// (more may be owed).
    async fn pass(&mut self) -> Result<bool, PassError> {
        let owed = self
            .core
            .store
            .documents_owed(self.batch)
            .await
            .map_err(|e| store_error(&e))?;
        let full = owed.len() >= self.batch;
        let mut stored = Vec::new();
        let mut failure = None;
        for listed in &owed {
            if self.skipped.contains(&listed.new.order_id) {
                continue;
            }
            let rendered = match self.render(listed).await {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let Some((kind, bytes)) = rendered else {
                continue;
            };
            let id = listed.new.order_id;
            let key = receipts::object_key(id, kind);
            match self.documents.archive.put_new(&key, bytes).await {
                Ok(_) => stored.push(Change::Document {
                    id,
                    kind: kind_of(kind),
                    key,
                }),
                Err(e) => {
                    failure = Some(PassError::Archive(e));
                    break;
                }
            }
        }
        // What was stored is recorded even when the pass stopped early.
        if !stored.is_empty() {
            let applied = self
                .core
                .store
                .apply_batch(&stored)
                .await
                .map_err(|e| store_error(&e))?;
            let recorded = applied.iter().filter(|a| **a).count() as u64;
            SettlerStats::add(&self.core.counters().documents, recorded);
            metrics().event(Event::Documented, recorded);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(full && !stored.is_empty()),
        }
    }
}

/// Writes owed documents until shutdown (see the module's documentation).
pub(crate) async fn receipts(
    core: Arc<Core>,
    documents: Documents,
    settings: ReceiptSettings,
    shutdown: CancellationToken,
) {
    let interval = settings.interval.max(Duration::from_millis(1));
    let mut stage = ReceiptStage {
        core: Arc::clone(&core),
        documents,
        batch: settings.batch.max(1),
        sales: HashMap::new(),
        skipped: Skipped::default(),
    };
    let mut failing = false;
    let mut delay = interval;
    let mut again = true;
    loop {
        if !again {
            if failing {
                // Backing off: a status change does not cut the wait short.
                if !pause(&shutdown, delay).await {
                    return;
                }
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = core.documents_ready.notified() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = stage.pass() => r,
        };
        match outcome {
            Ok(more) => {
                if failing {
                    tracing::info!("receipts: documents are written again");
                }
                failing = false;
                delay = interval;
                again = more;
            }
            Err(e) => {
                if !failing {
                    let credentials = matches!(
                        e,
                        PassError::Archive(receipts::ArchiveError::Credentials(_))
                    );
                    tracing::warn!(error = %e, credentials, "receipts: documents not written; retrying with backoff (settlement goes on)");
                }
                if failing {
                    delay = (delay * 2).min(MAX_BACKOFF.max(interval));
                }
                failing = true;
                again = false;
            }
        }
    }
}
