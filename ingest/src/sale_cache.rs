//! The sale definitions the order path reads, stale-while-revalidate.
//!
//! A sale once loaded is answered from memory. When its entry is older than the TTL, the
//! request that notices starts ONE background refresh and every request (that one
//! included) keeps getting the cached value meanwhile; a refresh that fails keeps the old
//! value and is tried again a TTL later. Only a sale never seen waits for the store, and
//! concurrent requests for it share one load (single flight). Unknown ids are cached too
//! (so they cost no store call), but only for the TTL, after which they are loaded again
//! on the request path. The cache holds at most `capacity` sales.
//!
//! This instance's own catalog changes (a sale created, stock added) [`put`](SaleCache::put)
//! the store's new value directly, so no request waits after them either; a refresh that
//! read the store before such a change does not overwrite it.

use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::{Sale, SaleId};

/// Loads one sale from the store.
pub(crate) type Loader =
    Arc<dyn Fn(SaleId) -> BoxFuture<'static, storage::Result<Option<Sale>>> + Send + Sync>;

struct Entry {
    sale: Option<Arc<Sale>>,
    loaded: Instant,
    refreshing: AtomicBool,
}

impl Entry {
    fn new(sale: Option<Arc<Sale>>) -> Arc<Entry> {
        Arc::new(Entry {
            sale,
            loaded: Instant::now(),
            refreshing: AtomicBool::new(false),
        })
    }
}

/// Unknown ids expire after the TTL; known sales never expire by time (they are refreshed
/// in the background and leave only when the capacity evicts them).
struct UnknownExpire(Duration);

impl moka::Expiry<SaleId, Arc<Entry>> for UnknownExpire {
    fn expire_after_create(
        &self,
        _key: &SaleId,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        value.sale.is_none().then_some(self.0)
    }

    fn expire_after_update(
        &self,
        _key: &SaleId,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value.sale.is_none().then_some(self.0)
    }
}

/// Sale definitions by id (see the module documentation).
#[derive(Clone)]
pub(crate) struct SaleCache {
    entries: moka::future::Cache<SaleId, Arc<Entry>>,
    ttl: Duration,
    loader: Loader,
    /// Background refreshes finished (stored or discarded).
    refreshes: Arc<AtomicUsize>,
}

impl SaleCache {
    /// A cache of at most `capacity` sales, refreshed when older than `ttl`.
    pub(crate) fn new(capacity: u64, ttl: Duration, loader: Loader) -> Self {
        SaleCache {
            entries: moka::future::Cache::builder()
                .max_capacity(capacity)
                .expire_after(UnknownExpire(ttl))
                .build(),
            ttl,
            loader,
            refreshes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The sale (`None`: the store does not know it). Waits for the store only when the
    /// id was never seen (or an unknown id's entry expired).
    pub(crate) async fn get(&self, id: &SaleId) -> Result<Option<Arc<Sale>>, Arc<storage::Error>> {
        let loader = &self.loader;
        let entry = self
            .entries
            .try_get_with_by_ref(id, async move {
                loader(id.clone())
                    .await
                    .map(|s| Entry::new(s.map(Arc::new)))
            })
            .await?;
        if entry.sale.is_some()
            && entry.loaded.elapsed() >= self.ttl
            && !entry.refreshing.swap(true, Ordering::AcqRel)
        {
            self.refresh(id.clone(), Arc::clone(&entry));
        }
        Ok(entry.sale.clone())
    }

    /// Puts the store's current definition of a sale this instance just changed.
    pub(crate) async fn put(&self, sale: Sale) {
        self.entries
            .insert(sale.id.clone(), Entry::new(Some(Arc::new(sale))))
            .await;
    }

    /// Reloads `id` in a task of its own; replaces `old` only if it is still the entry.
    fn refresh(&self, id: SaleId, old: Arc<Entry>) {
        let (entries, refreshes) = (self.entries.clone(), Arc::clone(&self.refreshes));
        let load = (self.loader)(id.clone());
        tokio::spawn(async move {
            let fresh = match load.await {
                Ok(sale) => Entry::new(sale.map(Arc::new)),
                Err(e) => {
                    // Keep serving what we have; tried again a TTL from now.
                    tracing::warn!(error = %storage::ErrorChain(&e), sale = %id, "refreshing a sale failed; serving the cached definition");
                    Entry::new(old.sale.clone())
                }
            };
            entries
                .entry(id)
                .and_compute_with(|current| async move {
                    match current {
                        Some(c) if Arc::ptr_eq(c.value(), &old) => {
                            moka::ops::compute::Op::Put(fresh)
                        }
                        _ => moka::ops::compute::Op::Nop,
                    }
                })
                .await;
            refreshes.fetch_add(1, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{Currency, Money, Timestamp, UserRate};
    use tokio::sync::Semaphore;

    fn sale(id: &SaleId, sku: &str) -> Sale {
        let now = Timestamp::now();
        Sale {
            stock_buckets: 1,
            id: id.clone(),
            sku: sku.into(),
            stock: 10,
            price: Money {
                minor: 100,
                currency: Currency::parse("EUR").expect("eur"),
            },
            starts_at: now,
            ends_at: now.plus_millis(60_000),
            per_user_limit: 1,
            max_quantity_per_order: 1,
            user_rate: UserRate::default(),
            created_at: now,
        }
    }

    /// A store whose loads after the first `free` ones wait for a permit of `gate`; each
    /// load answers the sale with sku `v{n}` (n = the load's number, from 1).
    struct Store {
        loads: AtomicUsize,
        free: usize,
        gate: Semaphore,
        known: bool,
    }

    fn loader(store: &Arc<Store>) -> Loader {
        let store = Arc::clone(store);
        Arc::new(move |id: SaleId| {
            let store = Arc::clone(&store);
            Box::pin(async move {
                let n = store.loads.fetch_add(1, Ordering::SeqCst) + 1;
                if n > store.free {
                    store.gate.acquire().await.expect("gate").forget();
                }
                Ok(store.known.then(|| sale(&id, &format!("v{n}"))))
            })
        })
    }

    #[tokio::test]
    async fn a_stale_sale_is_served_while_its_refresh_is_blocked() {
        let store = Arc::new(Store {
            loads: AtomicUsize::new(0),
            free: 1,
            gate: Semaphore::new(0),
            known: true,
        });
        // TTL zero: every read finds the entry stale.
        let cache = SaleCache::new(100, Duration::ZERO, loader(&store));
        let id = SaleId::parse("s1").expect("id");
        let first = cache.get(&id).await.expect("load").expect("known");
        assert_eq!(first.sku, "v1");
        // The refresh is blocked in the store: reads keep answering the cached value,
        // without waiting, and start no second refresh.
        for _ in 0..50 {
            let got = tokio::time::timeout(Duration::from_secs(5), cache.get(&id))
                .await
                .expect("a read waited for the store")
                .expect("get")
                .expect("known");
            assert_eq!(got.sku, "v1");
        }
        testkit::eventually("the refresh to start", Duration::from_secs(10), || async {
            store.loads.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(
            store.loads.load(Ordering::SeqCst),
            2,
            "one refresh at a time"
        );
        // Once the store answers, the new value is served.
        store.gate.add_permits(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = cache.get(&id).await.expect("get").expect("known");
            if got.sku != "v1" {
                assert_eq!(got.sku, "v2");
                break;
            }
            assert!(Instant::now() < deadline, "the refresh never landed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        store.gate.add_permits(1000);
    }

    #[tokio::test]
    async fn a_sale_never_seen_is_loaded_once_for_concurrent_readers() {
        let store = Arc::new(Store {
            loads: AtomicUsize::new(0),
            free: 0,
            gate: Semaphore::new(0),
            known: true,
        });
        let cache = SaleCache::new(100, Duration::from_secs(60), loader(&store));
        let id = SaleId::parse("s1").expect("id");
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (cache, id) = (cache.clone(), id.clone());
                tokio::spawn(async move { cache.get(&id).await })
            })
            .collect();
        testkit::eventually("the load to start", Duration::from_secs(10), || async {
            store.loads.load(Ordering::SeqCst) == 1
        })
        .await;
        store.gate.add_permits(1);
        for r in readers {
            let got = r.await.expect("join").expect("get").expect("known");
            assert_eq!(got.sku, "v1");
        }
        assert_eq!(store.loads.load(Ordering::SeqCst), 1);
        // Fresh: no refresh.
        cache.get(&id).await.expect("get");
        assert_eq!(store.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_ids_are_cached_for_the_ttl_only() {
        let store = Arc::new(Store {
            loads: AtomicUsize::new(0),
            free: usize::MAX,
            gate: Semaphore::new(0),
            known: false,
        });
        let cache = SaleCache::new(100, Duration::from_secs(60), loader(&store));
        let id = SaleId::parse("nope").expect("id");
        assert!(cache.get(&id).await.expect("get").is_none());
        assert!(cache.get(&id).await.expect("get").is_none());
        assert_eq!(store.loads.load(Ordering::SeqCst), 1);

        let cache = SaleCache::new(100, Duration::ZERO, loader(&store));
        assert!(cache.get(&id).await.expect("get").is_none());
        assert!(cache.get(&id).await.expect("get").is_none());
        assert_eq!(
            store.loads.load(Ordering::SeqCst),
            3,
            "expired, loaded again"
        );
    }

    #[tokio::test]
    async fn a_put_is_not_overwritten_by_a_refresh_that_read_before_it() {
        let store = Arc::new(Store {
            loads: AtomicUsize::new(0),
            free: 1,
            gate: Semaphore::new(0),
            known: true,
        });
        let cache = SaleCache::new(100, Duration::ZERO, loader(&store));
        let id = SaleId::parse("s1").expect("id");
        cache.get(&id).await.expect("get");
        cache.get(&id).await.expect("get"); // starts a refresh, blocked
        testkit::eventually("the refresh to start", Duration::from_secs(10), || async {
            store.loads.load(Ordering::SeqCst) == 2
        })
        .await;
        cache.put(sale(&id, "put")).await;
        store.gate.add_permits(1);
        // The old refresh read v2 before the put; it finds its entry replaced.
        testkit::eventually(
            "the old refresh to finish",
            Duration::from_secs(10),
            || async { cache.refreshes.load(Ordering::Acquire) == 1 },
        )
        .await;
        let got = cache.entries.get(&id).await.expect("entry");
        assert_eq!(got.sale.as_ref().expect("known").sku, "put");
        store.gate.add_permits(1000);
    }
}
