//! Cluster key layout: the slot map of `CLUSTER SLOTS`, and the hash-tag that puts a prefixed key in its own
//! key's slot.

use super::*;

/// The slot ranges of a `CLUSTER SLOTS` reply: first slot, last slot, and the primary's host and port.
pub(super) fn slot_ranges(slots: redis::Value) -> Result<Vec<(u16, u16, String, u16)>> {
    fn parse<T: redis::FromRedisValue>(v: redis::Value) -> Result<T> {
        Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
    }
    let mut out: Vec<(u16, u16, String, u16)> = Vec::new();
    for range in parse::<Vec<Vec<redis::Value>>>(slots)? {
        let mut range = range.into_iter();
        let (Some(first), Some(last), Some(primary)) = (range.next(), range.next(), range.next())
        else {
            continue;
        };
        let mut node = parse::<Vec<redis::Value>>(primary)?.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else {
            continue;
        };
        out.push((parse(first)?, parse(last)?, parse(host)?, parse(port)?));
    }
    // Every slot must be covered, or some leases would not be revoked and some keys not scanned.
    let covered: u32 = out
        .iter()
        .map(|(first, last, ..)| u32::from(last.saturating_sub(*first)) + 1)
        .sum();
    if covered != 16_384
        || out
            .iter()
            .any(|(.., host, _)| host.is_empty() || host == "?")
    {
        return Err(Error::Redis(redis::RedisError::from((
            redis::ErrorKind::Client,
            "CLUSTER SLOTS does not cover every slot with an addressed primary (the cluster is changing)",
        ))));
    }
    Ok(out)
}

/// For every hash slot, a short tag (decimal digits) that hashes to it: `{tag}` in a key puts the key in that slot.
/// Found by trying 0, 1, 2, … (about 170,000 CRC16s, once per process, on first use of a cluster).
pub(super) static SLOT_TAGS: LazyLock<HashMap<Slot, Box<str>>> = LazyLock::new(|| {
    const SLOTS: usize = 16_384;
    let mut tags = HashMap::with_capacity(SLOTS);
    for i in 0u32.. {
        if tags.len() == SLOTS {
            break;
        }
        let t = i.to_string();
        tags.entry(Slot::for_key(&t))
            .or_insert_with(|| t.into_boxed_str());
    }
    tags
});

/// The tag of the slot `key` hashes to (honouring a `{...}` hash tag in `key`).
pub(super) fn slot_tag(key: &str) -> &'static str {
    &SLOT_TAGS[&Slot::for_key(key)]
}
