//! Replays the checked-in fuzz corpus on stable: every file of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same check the cargo-fuzz target runs
//! (`ingest::fuzzing`, `sequencer::fuzzing`), so a fixed finding stays fixed without a
//! nightly toolchain. `scripts/fuzz.sh` runs the targets themselves.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` on every file of the target's corpus and regressions; fails naming every
/// file whose check panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let files = files(target);
    assert!(
        files.len() >= 5,
        "fuzz/corpus/{target} holds {} files; the corpus is missing",
        files.len()
    );
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("read corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data)))
                .err()
                .map(|_| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs fail their check: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn order_body_corpus() {
    replay("order_body", ingest::fuzzing::order_body);
}

#[test]
fn jwt_corpus() {
    replay("jwt", ingest::fuzzing::jwt);
}

#[test]
fn record_corpus() {
    replay("record", sequencer::fuzzing::record);
}

#[test]
fn embedded_log_corpus() {
    replay("embedded_log", sequencer::fuzzing::embedded_log);
}

/// The seeds reach the accepting side of each check, so the replay checks more than
/// refusals (and a changed secret or format shows here rather than as a silent corpus).
#[tokio::test]
async fn seeds_reach_acceptance() {
    let seed = |target: &str, name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(target)
                .join(name),
        )
        .expect("seed")
    };
    let body = ingest::api::parse_order_body(&seed("order_body", "valid")).expect("valid body");
    assert_eq!(
        (body.quantity, body.payment_token.as_str()),
        (1, "tok_visa")
    );

    let auth = ingest::auth::Auth::new(&ingest::fuzzing::jwt_config()).expect("auth");
    for name in ["token_valid_hs256", "token_valid_hs384"] {
        let token = seed("jwt", name);
        let user = auth
            .verify(std::str::from_utf8(&token[1..]).expect("ascii"))
            .expect(name);
        assert_eq!(user.as_str(), "alice");
    }

    let record = sequencer::decode(&seed("record", "valid")).expect("valid record");
    assert_eq!(record.sequence, 7);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("orders-0.log"),
        seed("embedded_log", "three"),
    )
    .expect("write");
    let log = sequencer::embedded::FileLog::open(dir.path(), Default::default()).expect("open");
    assert_eq!(log.len(), 3);
}
