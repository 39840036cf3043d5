//! The checkpoint of embedded admission: every sale's durable state at a log position, so
//! a restart reads only the log after it (and the segments before it can be deleted).
//!
//! Written by the maintenance task (`src/maintain.rs`) every `log.checkpoint_interval`:
//! first it reads the log from the previous checkpoint to the current end `L` and marks
//! each order there durable ([`SaleState::mark_durable`]: its answer confirmed, claimed),
//! then it snapshots each sale ([`SaleState::durable_snapshot`]: answers neither confirmed
//! nor claimed left out with their effect undone). Every record before `L` was accepted
//! before the snapshot and is now confirmed, so the snapshot holds exactly the records
//! before `L` plus whatever is confirmed or claimed past it; recovery replays from `L` with
//! [`SaleState::restore_accepted`], which counts an order it already holds once.
//!
//! Format: one JSON document (`version`, `log_offset`, `sales`), written to a temporary
//! file, fsynced, renamed over the previous checkpoint and the directory fsynced, so a
//! crash leaves the old checkpoint or the new one, never half of one.

use crate::admission::EmbeddedAdmission;
use crate::model::{SaleRules, SaleState, Snapshot};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use storage::{Sale, SaleId};

/// Version of the checkpoint format.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The checkpoint's file name (in the log's directory).
pub const CHECKPOINT_FILE: &str = "admission-checkpoint.json";

/// Errors of reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("admission checkpoint i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a checkpoint this version reads.
    #[error("admission checkpoint {path} is unreadable: {why}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
}

/// Every sale's durable admission state at a log position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// Every record before this offset is in `sales`; recovery replays from it.
    pub log_offset: u64,
    /// Each sale's state.
    pub sales: Vec<(SaleId, Snapshot)>,
}

impl EmbeddedAdmission {
    /// Snapshots every sale (see the module docs: the caller marked every record before
    /// `log_offset` durable first). Holds each sale's lock while copying it.
    pub fn checkpoint(&self, log_offset: u64) -> Checkpoint {
        let sales = self
            .sales()
            .into_iter()
            .map(|(id, state)| (id, state.lock().durable_snapshot()))
            .collect();
        Checkpoint {
            version: CHECKPOINT_VERSION,
            log_offset,
            sales,
        }
    }

    /// Recovery: puts each sale of the catalog in the state the checkpoint held (under the
    /// catalog's rules, so stock added since counts), or fresh if the checkpoint does not
    /// know it. Sales the catalog does not hold are left out.
    pub fn restore_checkpoint(&self, checkpoint: Checkpoint, catalog: &[Sale]) {
        let mut saved: std::collections::HashMap<SaleId, Snapshot> =
            checkpoint.sales.into_iter().collect();
        for sale in catalog {
            let rules = SaleRules::of(sale);
            let state = match saved.remove(&sale.id) {
                Some(snapshot) => SaleState::from_snapshot(snapshot, rules, self.limits()),
                None => SaleState::with_limits(rules, self.limits()),
            };
            self.restore_state(sale.id.clone(), state);
        }
    }
}

/// Writes `checkpoint` to `dir/`[`CHECKPOINT_FILE`] atomically (temporary file, fsync,
/// rename, directory fsync).
pub fn write(dir: &Path, checkpoint: &Checkpoint) -> Result<(), Error> {
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    let file = File::create(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    serde_json::to_writer(&mut out, checkpoint).map_err(std::io::Error::other)?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads `dir/`[`CHECKPOINT_FILE`]; `None` if there is none.
pub fn read(dir: &Path) -> Result<Option<Checkpoint>, Error> {
    let path = dir.join(CHECKPOINT_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let unreadable = |why: String| Error::Unreadable {
        path: path.display().to_string(),
        why,
    };
    let checkpoint: Checkpoint = serde_json::from_reader(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| unreadable(e.to_string()))?;
    if checkpoint.version != CHECKPOINT_VERSION {
        return Err(unreadable(format!(
            "version {} (this build reads {CHECKPOINT_VERSION})",
            checkpoint.version
        )));
    }
    Ok(Some(checkpoint))
}
