//! The archive on each backend: memory, a local directory and an S3 API (the testkit's
//! SeaweedFS): create-if-absent, reads, listings, key prefixes, refused credentials and bad
//! settings.
#![allow(clippy::unwrap_used)]

use receipts::{Archive, ArchiveConfig, ArchiveError, Stored};
use std::time::Duration;
use testkit::S3Server;

fn config(url: &str) -> ArchiveConfig {
    ArchiveConfig {
        url: url.into(),
        ..ArchiveConfig::default()
    }
}

/// The behaviour every backend shares.
async fn exercise(archive: &Archive) {
    archive.probe().await.unwrap();
    assert_eq!(archive.get("receipts/00/a.pdf").await.unwrap(), None);
    assert_eq!(
        archive
            .put_new("receipts/00/a.pdf", b"%PDF-first".to_vec())
            .await
            .unwrap(),
        Stored::Written
    );
    assert_eq!(
        archive
            .put_new("receipts/00/a.pdf", b"%PDF-second".to_vec())
            .await
            .unwrap(),
        Stored::AlreadyThere
    );
    assert_eq!(
        archive.get("receipts/00/a.pdf").await.unwrap().unwrap(),
        &b"%PDF-first"[..]
    );
    archive
        .put_new("receipts/01/b.pdf", b"b".to_vec())
        .await
        .unwrap();
    archive
        .put_new("refund-notes/02/c.pdf", b"c".to_vec())
        .await
        .unwrap();
    assert_eq!(
        archive.keys("receipts").await.unwrap(),
        vec!["receipts/00/a.pdf", "receipts/01/b.pdf"]
    );
    assert_eq!(archive.keys("").await.unwrap().len(), 3);
    // The probe key is only asked for, never written.
    archive.probe().await.unwrap();
    assert_eq!(archive.keys("").await.unwrap().len(), 3);
}

#[tokio::test]
async fn memory_archive() {
    exercise(&Archive::open(&config("memory://")).unwrap()).await;
    exercise(&Archive::open(&config("memory://some/prefix")).unwrap()).await;
}

#[tokio::test]
async fn file_archive_creates_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not/yet/there");
    let archive = Archive::open(&config(&format!("file://{}", dir.display()))).unwrap();
    assert!(dir.is_dir());
    exercise(&archive).await;
    assert_eq!(
        std::fs::read(dir.join("receipts/00/a.pdf")).unwrap(),
        b"%PDF-first"
    );
}

#[test]
fn bad_urls_name_the_setting() {
    for url in ["", "ftp://x/y", "file://relative/dir", "s3://", "memory"] {
        let err = Archive::open(&config(url)).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Config {
                    setting: "receipts.url",
                    ..
                }
            ),
            "{url:?}: {err:?}"
        );
        assert!(err.to_string().starts_with("receipts.url: "), "{err}");
    }
}

fn s3_config(s3: &S3Server, url: &str, secret: &str) -> ArchiveConfig {
    ArchiveConfig {
        url: url.into(),
        endpoint: s3.endpoint(),
        region: s3.region().into(),
        access_key_id: s3.access_key().into(),
        secret_access_key: secret.into(),
        allow_http: true,
    }
}

#[tokio::test]
async fn s3_archive() {
    let s3 = S3Server::start();
    let url = format!("s3://{}", s3.bucket());
    let archive = Archive::open(&s3_config(&s3, &url, s3.secret_key())).unwrap();
    exercise(&archive).await;

    // A prefix in the URL prefixes every key, and the listing is relative to it.
    let prefixed = Archive::open(&s3_config(
        &s3,
        &format!("s3://{}/shop-1", s3.bucket()),
        s3.secret_key(),
    ))
    .unwrap();
    exercise(&prefixed).await;
    assert_eq!(archive.keys("shop-1").await.unwrap().len(), 3);
    assert_eq!(
        archive
            .get("shop-1/receipts/00/a.pdf")
            .await
            .unwrap()
            .unwrap(),
        &b"%PDF-first"[..]
    );

    // A wrong secret: the probe and every other call say Credentials.
    let wrong = Archive::open(&s3_config(&s3, &url, "not-the-secret")).unwrap();
    let err = wrong.probe().await.unwrap_err();
    assert!(matches!(err, ArchiveError::Credentials(_)), "{err:?}");
    let err = wrong
        .put_new("receipts/09/z.pdf", b"z".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, ArchiveError::Credentials(_)), "{err:?}");

    // A plain-HTTP endpoint without allow_http is a settings error.
    let mut no_http = s3_config(&s3, &url, s3.secret_key());
    no_http.allow_http = false;
    let err = Archive::open(&no_http).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Config {
                setting: "receipts.endpoint",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn s3_down_is_unavailable() {
    let mut s3 = S3Server::start();
    let url = format!("s3://{}", s3.bucket());
    let archive = Archive::open(&s3_config(&s3, &url, s3.secret_key())).unwrap();
    archive.probe().await.unwrap();
    s3.kill();
    let err = archive.probe().await.unwrap_err();
    assert!(matches!(err, ArchiveError::Unavailable(_)), "{err:?}");
    s3.restart();
    testkit::eventually(
        "the archive answers again",
        Duration::from_secs(30),
        || async { archive.probe().await.is_ok() },
    )
    .await;
}
