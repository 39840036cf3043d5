//! Which shard holds an order: a jump consistent hash (Lamping & Veach, "A Fast, Minimal
//! Memory, Consistent Hash Algorithm", 2014) of a well-mixed 64-bit key of the order id.
//!
//! The key is the last 8 bytes of the id's UUID (in a UUIDv7 they hold the variant bits, a
//! counter and random bits) run through the splitmix64 finalizer, so that ids made in the
//! same millisecond still spread evenly. The mapping is fixed forever: changing the mixer,
//! the key bytes or the hash would move every stored order to a shard that does not hold it.
//!
//! # Shards are numbered by their position in the configuration
//!
//! Shard `i` is the `i`-th database URL of the store's shard list. Never reorder the list and
//! never remove an entry: that changes which database answers for which ids.
//!
//! # Adding shards
//!
//! Going from `n` to `n + 1` shards, jump hash moves only the ids whose new shard is `n` (the
//! new one), about `1 / (n + 1)` of them; every other id stays where it is. There is no
//! rebalance command; the procedure is:
//!
//! 1. Stop every settler (and `flashsale reconcile`): nothing may write orders meanwhile.
//!    Ingest may keep running; accepted orders wait in the log.
//! 2. Create the new database and append its URL at the end of the shard list; run
//!    `flashsale migrate`, which migrates the new shard (and leaves the others as they are).
//! 3. Copy what moves: for each old shard `s`, every `orders` row whose
//!    [`shard_of`]`(order_id, n + 1) == n`, with all its `order_history` rows (keep
//!    `published` and the order of `id`), into the new shard; then delete those orders
//!    from `s` (the history follows by `ON DELETE CASCADE`). Insert with
//!    `ON CONFLICT DO NOTHING` and delete only after the copy committed, so the step can be
//!    run again after a failure. The catalog database (`sales`, `consumer_offsets`) does not
//!    change.
//! 4. Start the settlers with the new shard list.
//!
//! Removing a shard is not supported (jump hash can only drop the last bucket, which would
//! need the reverse copy).

use crate::OrderId;

/// Jump consistent hash: the bucket in `0..buckets` of `key`, as in the paper's reference
/// code. Going from `n` to `n + 1` buckets moves a key only into bucket `n`. `buckets == 0`
/// is treated as 1.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    // 0 <= b < buckets <= u32::MAX.
    b as u32
}

/// The splitmix64 finalizer (Steele, Lea & Flood): a fixed bijection of `u64` that spreads
/// every input bit over the whole output.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shard in `0..shards` holding order `id` (`shards == 0` is treated as 1).
pub fn shard_of(id: OrderId, shards: u32) -> u32 {
    let bytes = id.0.as_bytes();
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&bytes[8..]);
    jump_hash(splitmix64(u64::from_be_bytes(tail)), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_matches_the_reference_implementation() {
        // From the paper's C++ code (compiled and run), including the values other
        // implementations publish: (256, 1024) -> 520, (123456, 1000) -> 984,
        // (42, 57) -> 43, (0xDEAD10CC, 666) -> 361.
        let cases: &[(u64, u32, u32)] = &[
            (0, 1, 0),
            (0, 65536, 0),
            (1, 8, 6),
            (1, 57, 55),
            (1, 65536, 21134),
            (2, 666, 338),
            (42, 2, 1),
            (42, 57, 43),
            (42, 65536, 5747),
            (256, 1024, 520),
            (256, 65536, 8799),
            (123_456, 3, 2),
            (123_456, 1000, 984),
            (0xDEAD_10CC, 1, 0),
            (0xDEAD_10CC, 666, 361),
            (u64::MAX, 11, 10),
            (u64::MAX, 1000, 313),
            (10_863_919_174_838_991, 11, 6),
            (2_016_238_256_797_177_309, 11, 3),
            (2_016_238_256_797_177_309, 65536, 39755),
        ];
        for &(key, buckets, want) in cases {
            assert_eq!(jump_hash(key, buckets), want, "jump_hash({key}, {buckets})");
        }
        assert_eq!(jump_hash(42, 0), 0);
    }

    #[test]
    fn growing_moves_keys_only_into_the_new_bucket() {
        for n in 1..16u32 {
            let mut moved = 0u32;
            for i in 0..10_000u64 {
                let key = splitmix64(i);
                let (old, new) = (jump_hash(key, n), jump_hash(key, n + 1));
                assert!(old < n && new < n + 1);
                if old != new {
                    assert_eq!(new, n, "a key may move only into the new bucket");
                    moved += 1;
                }
            }
            // About 1/(n+1) of the keys move.
            let expected = 10_000.0 / f64::from(n + 1);
            assert!(
                (f64::from(moved) - expected).abs() < expected * 0.15 + 50.0,
                "{moved} of 10000 moved going to {} buckets",
                n + 1
            );
        }
    }

    #[test]
    fn order_ids_spread_evenly_over_shards() {
        let shards = 4;
        let mut counts = [0u32; 4];
        for _ in 0..20_000 {
            counts[shard_of(OrderId::new(), shards) as usize] += 1;
        }
        for c in counts {
            assert!((4_500..=5_500).contains(&c), "{counts:?}");
        }
        let id = OrderId::new();
        assert_eq!(shard_of(id, 7), shard_of(id, 7));
        assert_eq!(shard_of(id, 1), 0);
    }
}
