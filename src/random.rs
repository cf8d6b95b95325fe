//! Random ids that must differ between processes and calls.

/// 64 random bits (std's per-call random hasher keys, seeded from the OS), for ids and tokens that must differ
/// between processes and calls: lease tokens' seed, fleet epochs, L1 instance ids, tag invalidation tokens. Not
/// for secrets.
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::hash::RandomState::new().hash_one((std::process::id(), now))
}
