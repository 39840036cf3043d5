//! The harness's S3 server (SeaweedFS `weed mini`) with the `object_store` crate: writes,
//! reads and lists, create-if-absent (`PutMode::Create`, sent as `If-None-Match: *`) refused
//! on an existing key even when racing, wrong credentials refused, and a server that is
//! down or hung failing requests within the client's timeouts, then back with its data.
#![allow(clippy::unwrap_used)]

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig,
};
use std::time::{Duration, Instant};
use testkit::S3Server;

/// How long one request may take, and how long a failing one is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_TIMEOUT: Duration = Duration::from_secs(1);
/// A failed request must have ended by then (timeout and retries included).
const FAIL_WITHIN: Duration = Duration::from_secs(6);

fn store_with(s3: &S3Server, bucket: &str, access_key: &str, secret_key: &str) -> AmazonS3 {
    store_timing_out(s3, bucket, access_key, secret_key, REQUEST_TIMEOUT)
}

fn store_timing_out(
    s3: &S3Server,
    bucket: &str,
    access_key: &str,
    secret_key: &str,
    timeout: Duration,
) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_region(s3.region())
        .with_bucket_name(bucket)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret_key)
        .with_virtual_hosted_style_request(false)
        // Client options replace the builder's whole set: `allow_http` goes in here.
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(timeout),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: RETRY_TIMEOUT,
        })
        .build()
        .unwrap()
}

fn store(s3: &S3Server) -> AmazonS3 {
    store_with(s3, s3.bucket(), s3.access_key(), s3.secret_key())
}

async fn get_bytes(store: &AmazonS3, path: &Path) -> Vec<u8> {
    store
        .get(path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn put_get_list_and_create_if_absent() {
    let s3 = S3Server::start();
    let store = store(&s3);
    let path = Path::from("2026/12/order-1.json");

    store
        .put(&path, PutPayload::from_static(b"{\"order\":1}"))
        .await
        .unwrap();
    assert_eq!(get_bytes(&store, &path).await, b"{\"order\":1}");

    let listed: Vec<_> = store
        .list(Some(&Path::from("2026")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].location, path);
    assert_eq!(listed[0].size, 11);

    // Create-if-absent on the existing key: refused, and the object is unchanged.
    let err = store
        .put_opts(
            &path,
            PutPayload::from_static(b"second"),
            PutMode::Create.into(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::AlreadyExists { .. }),
        "{err:?}"
    );
    assert_eq!(get_bytes(&store, &path).await, b"{\"order\":1}");

    // On a new key it writes.
    let fresh = Path::from("2026/12/order-2.json");
    store
        .put_opts(
            &fresh,
            PutPayload::from_static(b"{\"order\":2}"),
            PutMode::Create.into(),
        )
        .await
        .unwrap();
    assert_eq!(get_bytes(&store, &fresh).await, b"{\"order\":2}");

    // A missing key is NotFound; a bucket that does not exist is not created by a write.
    let err = store.get(&Path::from("nope")).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "{err:?}"
    );
    let other = store_with(&s3, "no-such-bucket", s3.access_key(), s3.secret_key());
    let err = other
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::NotFound { .. }),
        "{err:?}"
    );
}

/// Racing creates of one key: exactly one is written, every other is refused with
/// AlreadyExists. A loser may wait: in the first seconds after a start SeaweedFS serializes
/// writes to one key with a lock that a waiter polls once a second (later they go to the
/// key's owner filer and are answered in milliseconds), so these clients wait long.
#[tokio::test]
async fn of_racing_creates_of_one_key_exactly_one_wins() {
    const WRITERS: usize = 8;
    let s3 = S3Server::start();
    let store = store_timing_out(
        &s3,
        s3.bucket(),
        s3.access_key(),
        s3.secret_key(),
        Duration::from_secs(30),
    );
    for round in 0..3 {
        let path = Path::from(format!("race/{round}"));
        let started = Instant::now();
        let results = futures_util::future::join_all((0..WRITERS).map(|i| {
            let store = store.clone();
            let path = path.clone();
            async move {
                store
                    .put_opts(
                        &path,
                        PutPayload::from(format!("writer {i}")),
                        PutMode::Create.into(),
                    )
                    .await
            }
        }))
        .await;
        eprintln!(
            "round {round}: {WRITERS} racing creates done in {:?}",
            started.elapsed()
        );
        let winners: Vec<usize> = (0..WRITERS).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, object_store::Error::AlreadyExists { .. }),
                    "round {round}: {e:?}"
                );
            }
        }
        let stored = get_bytes(&store, &path).await;
        assert_eq!(stored, format!("writer {}", winners[0]).into_bytes());
    }
}

#[tokio::test]
async fn wrong_credentials_are_refused() {
    let s3 = S3Server::start();
    let path = Path::from("secret.txt");
    store(&s3)
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap();

    // A wrong secret: SignatureDoesNotMatch, 403.
    let wrong_secret = store_with(&s3, s3.bucket(), s3.access_key(), "not-the-secret");
    let err = wrong_secret.get(&path).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err:?}"
    );
    let err = wrong_secret
        .put(&path, PutPayload::from_static(b"y"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err:?}"
    );

    // An unknown access key: InvalidAccessKeyId, 403.
    let unknown = store_with(&s3, s3.bucket(), "someone-else", s3.secret_key());
    let err = unknown.get(&path).await.unwrap_err();
    assert!(
        matches!(err, object_store::Error::PermissionDenied { .. }),
        "{err:?}"
    );

    assert_eq!(get_bytes(&store(&s3), &path).await, b"x");
}

#[tokio::test]
async fn a_killed_server_fails_requests_quickly_and_comes_back_with_its_data() {
    let mut s3 = S3Server::start();
    let store = store(&s3);
    let path = Path::from("kept.txt");
    store
        .put(&path, PutPayload::from_static(b"kept"))
        .await
        .unwrap();

    s3.kill();
    assert!(!s3.is_running());
    let started = Instant::now();
    let err = store.get(&path).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < FAIL_WITHIN, "took {took:?}: {err:?}");
    assert!(
        matches!(err, object_store::Error::Generic { .. }),
        "{err:?}"
    );
    let err = store
        .put(&path, PutPayload::from_static(b"lost"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::Generic { .. }),
        "{err:?}"
    );

    let started = Instant::now();
    s3.restart();
    eprintln!("weed mini restarted in {:?}", started.elapsed());
    // Same endpoint, same data; writes go through again (the same client, its pooled
    // connections dead).
    assert_eq!(get_bytes(&store, &path).await, b"kept");
    let after = Path::from("after.txt");
    store
        .put(&after, PutPayload::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(get_bytes(&store, &after).await, b"after");
}

#[tokio::test]
async fn a_hung_server_fails_requests_within_the_timeout_and_resumes() {
    let mut s3 = S3Server::start();
    let store = store(&s3);
    let path = Path::from("hung.txt");
    store
        .put(&path, PutPayload::from_static(b"before"))
        .await
        .unwrap();

    s3.pause();
    let started = Instant::now();
    let err = store.get(&path).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < FAIL_WITHIN, "took {took:?}: {err:?}");
    assert!(took >= REQUEST_TIMEOUT, "took {took:?}: {err:?}");
    assert!(
        matches!(err, object_store::Error::Generic { .. }),
        "{err:?}"
    );

    s3.resume();
    assert_eq!(get_bytes(&store, &path).await, b"before");
}

#[test]
fn it_starts_in_seconds() {
    let started = Instant::now();
    let s3 = S3Server::start();
    let took = started.elapsed();
    eprintln!("weed mini ready in {took:?} at {}", s3.endpoint());
    assert!(s3.is_running());
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    assert!(s3.log().contains("S3 Endpoint"), "{}", s3.log());
}
