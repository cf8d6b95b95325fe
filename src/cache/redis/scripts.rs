//! The Lua scripts: every multi-key step that must be atomic (a lease, a fill under it, a tag's bookkeeping).

/// Value or lease, atomically. KEYS: key, lease key, generation key, tag sets…; ARGV: token, lease ms, the key
/// without prefix, `1` for a refresh (a lease even though the key holds a value). The lease holds `token:generation`. Returns `{1, value}`, `{2, token}` (granted) or `{3, ""}`
/// (held by another caller).
pub(super) static LEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if ARGV[4] ~= '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, v} end
end
local g = redis.call('GET', KEYS[3]) or '0'
if not redis.call('SET', KEYS[2], ARGV[1] .. ':' .. g, 'NX', 'PX', ARGV[2]) then return {3, ''} end
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3])
  local t = redis.call('PTTL', KEYS[i])
  if t >= 0 and t < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return {2, ARGV[1]}
",
    )
});

/// Fill under a lease: only if the lease still holds the token and the generation has not moved (a pattern deletion
/// or flush since the lease was granted moves it). KEYS: key, lease key, generation key, tag sets…; ARGV: token,
/// value, TTL ms, the key without prefix.
pub(super) static SET_LEASED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local g = redis.call('GET', KEYS[3]) or '0'
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ':' .. g then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[4])
  local t = redis.call('PTTL', KEYS[i])
  if t == -1 or t < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1
",
    )
});

/// Ends a lease if it is still the caller's (`token:…`). KEYS: lease key; ARGV: token.
pub(super) static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local l = redis.call('GET', KEYS[1])
if l and string.sub(l, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Cluster only: records ARGV[1] in the tag set KEYS[1], which then lives at least ARGV[2] ms (or, with ARGV[2]
/// empty, without expiry). A set that already lives without expiry keeps living so (one of its entries does).
pub(super) static TAG_ADD: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SADD', KEYS[1], ARGV[1])
if ARGV[2] == '' then redis.call('PERSIST', KEYS[1]) return 1 end
local t = redis.call('PTTL', KEYS[1])
if existed == 0 or (t >= 0 and t < tonumber(ARGV[2])) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
",
    )
});

/// Cluster only: moves the members of the tag set KEYS[1] into its pending hash KEYS[2] (same slot), marks every
/// pending member with this invalidation's token ARGV[1], and returns them. The pending hash lives as long as the tag
/// set would have, and at least ARGV[2] ms (persistent if either was).
pub(super) static TAG_TAKE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('PTTL', KEYS[1])
local p = redis.call('PTTL', KEYS[2])
local seen, out = {}, {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do seen[m] = true end
for _, m in ipairs(redis.call('HKEYS', KEYS[2])) do seen[m] = true end
for m in pairs(seen) do
  redis.call('HSET', KEYS[2], m, ARGV[1])
  out[#out + 1] = m
end
redis.call('DEL', KEYS[1])
if #out > 0 then
  if t == -1 or p == -1 then
    redis.call('PERSIST', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[2], math.max(t, p, tonumber(ARGV[2])))
  end
end
return out
",
    )
});

/// Cluster only: removes from the pending hash KEYS[1] the members ARGV[2..] still marked with token ARGV[1] (a later
/// invalidation that took them again owns them now).
pub(super) static TAG_DONE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then n = n + redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return n
",
    )
});

/// Suffix of a cluster tag's pending hash (members taken by an invalidation and not yet deleted → its token).
pub(super) const PENDING_SUFFIX: &str = " ~pending";

/// Deletes a tag's entries and their leases. KEYS: tag set; ARGV: namespace prefix, lease suffix.
pub(super) static INVALIDATE_TAG: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', ARGV[1] .. k)
  redis.call('DEL', ARGV[1] .. k .. ARGV[2])
end
redis.call('DEL', KEYS[1])
return n
",
        )
    });
