//! Cache key → key pattern, and a bounded table of the patterns seen.
//!
//! A key is split on `:`. Segments that look like ids (all digits, a UUID, a long hex string, or a long
//! base64/base64url-like token that contains a digit) become `*`, and trailing `*` segments are dropped:
//!
//! | key | pattern |
//! |---|---|
//! | `user:123` | `user` |
//! | `user:123:profile` | `user:*:profile` |
//! | `mood:history:42:30` | `mood:history` |
//! | `session:3f2a…(32 hex)` | `session` |
//!
//! Applications can declare templates that take precedence: a template is a `:`-separated list of segments in
//! which `*` matches any one segment; a key whose first segments match a template gets the template as its pattern
//! (`tenant:*:user` turns `tenant:acme:user:7` into `tenant:*:user`, where the default rule would keep `acme`).
//! Templates are tried in the order given; the first match wins.
//!
//! The pattern is the unit of metrics, whitelisting and TTL, so the number of distinct patterns is bounded by
//! [`PatternTable`]: past the bound, new patterns fold into [`OTHER`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::error::{Error, Result};

/// Most distinct key patterns a registry tracks (`max_patterns` is clamped to it).
pub const MAX_PATTERNS_LIMIT: usize = 10_000;

/// The pattern that every pattern past the table's bound folds into.
pub const OTHER: &str = "other";

/// Longest accepted key, in bytes (Memcached's limit is 250; Redis allows far more, but keys this long are bugs).
pub const MAX_KEY_BYTES: usize = 1024;

/// The key → pattern rule: user templates first, then the default id-stripping rule.
///
/// Cheap to clone (the templates sit behind an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct KeyPatterns {
    templates: Arc<[Template]>,
}

#[derive(Debug)]
struct Template {
    text: String,
    segments: Vec<Option<String>>, // None = `*`
}

impl KeyPatterns {
    /// The default rule with the given templates (each `:`-separated, `*` for a wildcard segment).
    ///
    /// # Errors
    /// [`Error::InvalidPattern`] for an empty template or one with an empty segment.
    pub fn new<S: AsRef<str>>(templates: &[S]) -> Result<Self> {
        let templates = templates
            .iter()
            .map(|t| {
                let text = t.as_ref();
                validate_pattern(text)?;
                let segments = text
                    .split(':')
                    .map(|s| (s != "*").then(|| s.to_string()))
                    .collect();
                Ok(Template {
                    text: text.to_string(),
                    segments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyPatterns {
            templates: templates.into(),
        })
    }

    /// The key pattern of `key`. Borrows from `key` when the pattern is a prefix of it (the common case: only
    /// trailing ids), so the hot path does not allocate.
    pub fn pattern_of<'k>(&'k self, key: &'k str) -> Cow<'k, str> {
        for t in self.templates.iter() {
            if t.matches(key) {
                return Cow::Borrowed(&t.text);
            }
        }
        default_pattern(key)
    }

    /// [`pattern_of`](Self::pattern_of) without a heap allocation for patterns up to 256 bytes: a pattern with
    /// an inner id is built in `buf`.
    /// `buf` starts as `None` and is only filled (256 bytes) for such a pattern.
    pub fn pattern_in<'a>(&'a self, key: &'a str, buf: &'a mut Option<PatternBuf>) -> Cow<'a, str> {
        for t in self.templates.iter() {
            if t.matches(key) {
                return Cow::Borrowed(&t.text);
            }
        }
        default_pattern_in(key, buf)
    }
}

impl Template {
    fn matches(&self, key: &str) -> bool {
        let mut parts = key.split(':');
        self.segments.iter().all(|seg| match (seg, parts.next()) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(s), Some(p)) => s == p,
        })
    }
}

/// The default rule alone (no templates). See the module documentation.
pub fn default_pattern(key: &str) -> Cow<'_, str> {
    match scan(key) {
        None => Cow::Borrowed("*"),
        Some((kept, false)) => Cow::Borrowed(kept),
        Some((kept, true)) => {
            let mut out = Vec::with_capacity(kept.len());
            write_stars(kept, |part| out.extend_from_slice(part));
            Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| kept.to_string()))
        }
    }
}

/// Stack room for a pattern with an inner id, so that computing it on the hot path does not allocate.
#[derive(Debug)]
pub struct PatternBuf([u8; PATTERN_BUF_BYTES]);

const PATTERN_BUF_BYTES: usize = 256;

impl Default for PatternBuf {
    fn default() -> Self {
        PatternBuf([0; PATTERN_BUF_BYTES])
    }
}

/// The key without its trailing ids, and whether an id sits inside it; `None` when every segment is an id.
#[inline]
fn scan(key: &str) -> Option<(&str, bool)> {
    // One pass over the bytes: the end of the last non-id segment, and whether an id comes before it.
    let b = key.as_bytes();
    let mut end = 0usize;
    let mut seen_id = false;
    let mut inner_id = false;
    let mut start = 0usize;
    loop {
        let stop = b[start..]
            .iter()
            .position(|&c| c == b':')
            .map_or(b.len(), |i| start + i);
        if is_id(&b[start..stop]) {
            seen_id = true;
        } else {
            inner_id |= seen_id;
            end = stop;
        }
        if stop == b.len() {
            break;
        }
        start = stop + 1;
    }
    (end > 0).then(|| (&key[..end], inner_id))
}

/// Feeds `kept` to `out` with every id segment replaced by `*`.
fn write_stars(kept: &str, mut out: impl FnMut(&[u8])) {
    for (i, seg) in kept.split(':').enumerate() {
        if i > 0 {
            out(b":");
        }
        out(if is_id(seg.as_bytes()) {
            b"*"
        } else {
            seg.as_bytes()
        });
    }
}

/// [`default_pattern`] that builds a pattern with an inner id in `buf` instead of on the heap (patterns up to 256
/// bytes; longer ones are allocated).
fn default_pattern_in<'a>(key: &'a str, buf: &'a mut Option<PatternBuf>) -> Cow<'a, str> {
    match scan(key) {
        None => Cow::Borrowed("*"),
        Some((kept, false)) => Cow::Borrowed(kept),
        Some((kept, true)) if kept.len() <= PATTERN_BUF_BYTES => {
            // A pattern is never longer than the key it comes from: `*` replaces a non-empty segment.
            let buf = buf.insert(PatternBuf::default());
            let mut n = 0;
            write_stars(kept, |part| {
                buf.0[n..n + part.len()].copy_from_slice(part);
                n += part.len();
            });
            match std::str::from_utf8(&buf.0[..n]) {
                Ok(p) => Cow::Borrowed(p),
                Err(_) => default_pattern(key), // unreachable: whole UTF-8 segments and ASCII are copied
            }
        }
        Some(_) => default_pattern(key),
    }
}

/// True for a segment that identifies one object rather than a kind of object.
#[inline]
fn is_id(b: &[u8]) -> bool {
    if b.is_empty() {
        return false;
    }
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
        return true;
    }
    if b.len() == 36 && is_uuid(b) {
        return true;
    }
    if b.len() >= 16 && b.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    // base64 / base64url tokens: long, no separators a word would have, and at least one digit.
    b.len() >= 20
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'+' | b'/' | b'='))
        && b.iter().any(u8::is_ascii_digit)
}

fn is_uuid(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    })
}

/// Checks that `key` can be used as a cache key: 1 to [`MAX_KEY_BYTES`] bytes, no whitespace or control
/// characters.
///
/// # Errors
/// [`Error::InvalidKey`] naming the key and the reason.
pub fn validate_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "empty key"
    } else if key.len() > MAX_KEY_BYTES {
        "longer than 1024 bytes"
    } else if key.bytes().any(|c| c <= b' ' || c == 0x7f) {
        // ASCII whitespace and control characters are exactly the bytes up to the space, and DEL.
        "contains whitespace or a control character"
    } else {
        return Ok(());
    };
    let mut shown = key.to_string();
    cut_to(&mut shown, 200);
    Err(Error::InvalidKey { key: shown, reason })
}

/// Shortens `s` to at most `max_bytes`, at a character boundary; `true` when something was cut. For showing
/// user input in errors.
pub(crate) fn cut_to(s: &mut String, max_bytes: usize) -> bool {
    if s.len() <= max_bytes {
        return false;
    }
    let mut cut = max_bytes;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    true
}

/// Checks a pattern name as used in a whitelist, a template or `[cache.patterns.<pattern>]`.
///
/// # Errors
/// [`Error::InvalidPattern`] for an empty name, an empty segment, whitespace, or more than 200 bytes.
pub fn validate_pattern(pattern: &str) -> Result<()> {
    let reason = if pattern.is_empty() {
        "empty pattern"
    } else if pattern.len() > 200 {
        "longer than 200 bytes"
    } else if pattern.split(':').any(str::is_empty) {
        "empty segment"
    } else if pattern
        .bytes()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        "contains whitespace or a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidPattern {
        pattern: pattern.to_string(),
        reason,
    })
}

type Map<V> = HashMap<Box<str>, Arc<V>, foldhash::fast::RandomState>;

/// A bounded, read-mostly map from pattern name to a per-pattern value (metric handles, statistics).
///
/// Lookups are lock-free (`ArcSwap` load plus one hash); an insert copies the map under a mutex, which happens at
/// most `max_patterns + 1` times in the life of the table. Past `max_patterns` distinct names every new name maps to
/// the [`OTHER`] entry, so no input can grow the table (or the metric series built from it) without bound.
pub struct PatternTable<V> {
    map: ArcSwap<Map<V>>,
    insert: Mutex<()>,
    full: AtomicBool,
    max_patterns: usize,
    make: Box<dyn Fn(&str) -> V + Send + Sync>,
}

impl<V> std::fmt::Debug for PatternTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatternTable")
            .field("patterns", &self.map.load().len())
            .field("max_patterns", &self.max_patterns)
            .finish()
    }
}

impl<V> PatternTable<V> {
    /// A table that holds at most `max_patterns` names besides [`OTHER`], creating values with `make(name)`.
    pub fn new(max_patterns: usize, make: impl Fn(&str) -> V + Send + Sync + 'static) -> Self {
        PatternTable {
            map: ArcSwap::from_pointee(Map::default()),
            insert: Mutex::new(()),
            full: AtomicBool::new(false),
            max_patterns,
            make: Box::new(make),
        }
    }

    /// The entry for `pattern`, created on first sight; [`OTHER`]'s entry once the table is full.
    /// Returns the name the entry is filed under and the entry.
    pub fn get(&self, pattern: &str) -> Arc<V> {
        let map = self.map.load();
        if let Some(v) = map.get(pattern) {
            return Arc::clone(v);
        }
        if self.full.load(Ordering::Acquire) {
            // Past the bound, unknown names go to `other` without the insert lock.
            if let Some(v) = map.get(OTHER) {
                return Arc::clone(v);
            }
        }
        drop(map);
        self.insert_slow(pattern)
    }

    #[cold]
    fn insert_slow(&self, pattern: &str) -> Arc<V> {
        let _guard = self
            .insert
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.map.load_full();
        if let Some(v) = current.get(pattern) {
            return Arc::clone(v);
        }
        let real = current.keys().filter(|k| &***k != OTHER).count();
        let name = if real < self.max_patterns {
            pattern
        } else {
            OTHER
        };
        if let Some(v) = current.get(name) {
            return Arc::clone(v);
        }
        let value = Arc::new((self.make)(name));
        let mut next = (*current).clone();
        next.insert(name.into(), Arc::clone(&value));
        self.map.store(Arc::new(next));
        if name == OTHER {
            self.full.store(true, Ordering::Release);
        }
        value
    }

    /// A snapshot of every (name, entry) pair, in no particular order.
    pub fn entries(&self) -> Vec<(String, Arc<V>)> {
        self.map
            .load()
            .iter()
            .map(|(k, v)| (k.to_string(), Arc::clone(v)))
            .collect()
    }

    /// The bound on distinct names (besides [`OTHER`]).
    pub fn max_patterns(&self) -> usize {
        self.max_patterns
    }
}

/// Property tests (proptest, 256 cases each, run by `cargo test`).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any string: no panic, the same answer twice, through a pattern table as through the default rule.
        #[test]
        fn any_key_maps_stably_and_never_panics(key in any::<String>()) {
            let a = default_pattern(&key).into_owned();
            prop_assert_eq!(&a, &default_pattern(&key).into_owned());
            let table = KeyPatterns::new::<&str>(&[]).expect("no templates");
            prop_assert_eq!(&a, &table.pattern_of(&key).into_owned());
            let _ = validate_key(&key);
        }

        /// Numeric ids become `*` inside a key and disappear at its end.
        #[test]
        fn ids_map_to_a_star(
            head in "[a-z][a-z_]{0,11}",
            tail in "[a-z][a-z_]{0,11}",
            id in any::<u64>(),
            ids in proptest::collection::vec(any::<u32>(), 1..4),
        ) {
            let pattern = |key: String| default_pattern(&key).into_owned();
            prop_assert_eq!(pattern(format!("{head}:{id}:{tail}")), format!("{head}:*:{tail}"));
            let trailing: Vec<String> = ids.iter().map(u32::to_string).collect();
            prop_assert_eq!(pattern(format!("{head}:{}", trailing.join(":"))), head.clone());
            prop_assert_eq!(pattern(format!("{head}:{tail}:{id}")), format!("{head}:{tail}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_numeric_id_is_dropped() {
        assert_eq!(default_pattern("user:123"), "user");
        assert_eq!(default_pattern("oltp:page:17"), "oltp:page");
        assert_eq!(default_pattern("mood:history:42:30"), "mood:history");
        assert_eq!(
            default_pattern("user:-5"),
            "user",
            "a negative id is still an id"
        );
        assert_eq!(default_pattern("user:-"), "user:-");
    }

    #[test]
    fn inner_id_becomes_star() {
        assert_eq!(default_pattern("user:123:profile"), "user:*:profile");
        assert_eq!(default_pattern("project:9:members"), "project:*:members");
        assert_eq!(default_pattern("a:1:b:2:c"), "a:*:b:*:c");
    }

    #[test]
    fn uuid_hex_and_token_segments_are_ids() {
        assert_eq!(
            default_pattern("order:550e8400-e29b-41d4-a716-446655440000:items"),
            "order:*:items"
        );
        assert_eq!(default_pattern("session:deadbeefdeadbeef01"), "session");
        assert_eq!(default_pattern("token:eyJhbGciOiJIUzI1NiJ9abc"), "token");
    }

    #[test]
    fn words_are_not_ids() {
        assert_eq!(default_pattern("config:features"), "config:features");
        assert_eq!(
            default_pattern("user:profile_settings"),
            "user:profile_settings"
        );
        assert_eq!(default_pattern("cafe:beef"), "cafe:beef");
    }

    #[test]
    fn key_of_only_ids_has_star_pattern() {
        assert_eq!(default_pattern("123"), "*");
        assert_eq!(default_pattern("1:2"), "*");
    }

    #[test]
    fn pattern_in_a_buffer_matches_the_allocating_rule_without_allocating() {
        let kp = KeyPatterns::default();
        for key in [
            "user:1",
            "user:1:profile",
            "a:1:b:2:c",
            "1:2",
            "x:550e8400-e29b-41d4-a716-446655440000:y",
            "é:1:ü",
        ] {
            let mut buf = None;
            let p = kp.pattern_in(key, &mut buf);
            assert_eq!(p, default_pattern(key), "{key}");
            assert!(matches!(p, Cow::Borrowed(_)), "{key} allocated");
        }
        let long = format!("{}:1:x", "s".repeat(300));
        let mut buf = None;
        assert_eq!(
            kp.pattern_in(&long, &mut buf),
            default_pattern(&long),
            "long patterns fall back to the heap"
        );
    }

    #[test]
    fn pattern_borrows_when_it_is_a_prefix() {
        assert!(matches!(default_pattern("user:123"), Cow::Borrowed(_)));
        assert!(matches!(default_pattern("user:1:profile"), Cow::Owned(_)));
    }

    #[test]
    fn templates_take_precedence_in_order() {
        let p = KeyPatterns::new(&["tenant:*:user", "tenant:*"]).expect("valid templates");
        assert_eq!(p.pattern_of("tenant:acme:user:7"), "tenant:*:user");
        assert_eq!(p.pattern_of("tenant:acme:project:7"), "tenant:*");
        assert_eq!(p.pattern_of("user:7"), "user");
        // A key shorter than the template does not match it.
        assert_eq!(p.pattern_of("tenant"), "tenant");
    }

    #[test]
    fn bad_templates_are_rejected() {
        assert!(KeyPatterns::new(&["a::b"]).is_err());
        assert!(KeyPatterns::new(&[""]).is_err());
    }

    #[test]
    fn bad_keys_are_rejected_with_reason() {
        assert!(validate_key("user:1").is_ok());
        let e = validate_key("").expect_err("empty");
        assert!(e.to_string().contains("empty"));
        assert!(validate_key("user 1").is_err());
        assert!(validate_key("user:\n").is_err());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let e = validate_key(&long).expect_err("too long");
        assert!(e.to_string().len() < 400, "error message truncates the key");
    }

    #[test]
    fn table_folds_into_other_past_its_bound() {
        let t = PatternTable::new(2, |name| name.to_string());
        assert_eq!(*t.get("a"), "a");
        assert_eq!(*t.get("b"), "b");
        assert_eq!(*t.get("c"), OTHER);
        assert_eq!(*t.get("d"), OTHER);
        assert_eq!(*t.get("a"), "a");
        let mut names: Vec<_> = t.entries().into_iter().map(|(k, _)| k).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "other"]);
    }

    #[test]
    fn table_returns_the_same_entry_for_the_same_name() {
        let t = PatternTable::new(10, |name| name.to_string());
        assert!(Arc::ptr_eq(&t.get("x"), &t.get("x")));
    }
}
