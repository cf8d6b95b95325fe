//! The versioned envelope every cached value is stored in, and the value formats inside it.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "CR"
//! 2       1     format version (2)
//! 3       1     flags: bits 0–1 the payload's format (0 raw bytes, 1 JSON, 2 postcard, 3 MessagePack), bit 2
//!               zstd-compressed,
//!               bit 3 a cached absence ("not found", see `cache_negative_secs`)
//! 4       4     type tag: FNV-1a (32-bit) of the Rust type name, mixed with the application's value version
//! 8       8     stored at: milliseconds since the Unix epoch, on the writer's clock
//! 16      4     fresh for: seconds after `stored at` (the TTL; u32::MAX: no expiry of its own)
//! 20      4     CRC-32 (IEEE) of bytes 0–19 and of the payload, little endian
//! 24      n     payload
//! ```
//!
//! All integers are little endian. A value written by another format version, for another type or value version,
//! or damaged in any byte fails [`decode`] with [`Error::Corrupt`], so it is never served and never panics. The
//! registry treats a damaged entry as a miss and deletes it (`error_type="corrupt"`); an entry of another version
//! ([`foreign`]: format version 1, the envelope before `stored at` and the format byte; another type or value
//! version) as a plain miss, replaced without an error.
//!
//! **Formats.** [`Format::MessagePack`] (the default) is MessagePack through
//! [rmp-serde](https://docs.rs/rmp-serde), with struct fields by name: a binary, self-describing format, so that
//! everything serde can express round-trips (`serde_json::Value`, untagged and internally tagged enums,
//! `#[serde(flatten)]`, `skip_serializing_if`), and a type that gains an optional field (`#[serde(default)]`) still
//! reads its old entries, as with JSON. A value that does not decode is a miss, never another value.
//! [`Format::Postcard`] ([postcard](https://docs.rs/postcard), wire format 1.0) is the most compact and the fastest,
//! but not self-describing: fields are read by position, so it suits plain structs of fixed shape only. Under
//! postcard a type using `deserialize_any` (the serde features above) never decodes, and **a field skipped on write
//! (`skip_serializing_if`) makes the next field be read in its place**: a wrong value; and any change of a cached
//! type's fields must bump the application's `value_version`. [`Format::Json`] (serde_json) is for values other
//! programs read from Redis. The reader decodes whichever format the flags name, so changing a pattern's format turns
//! no entry into a miss. Figures: `docs/performance.md` (`benches/codec.rs`).
//!
//! **Compression.** With the `zstd` feature, a payload longer than the pattern's `compress_above_bytes` is stored
//! zstd-compressed (level 3) when that makes it smaller. Decompression is bounded by [`MAX_DECOMPRESSED_BYTES`]: a
//! corrupted or hostile entry cannot make a reader allocate more. Without the feature a compressed entry is a miss.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 2] = b"CR";
const VERSION: u8 = 2;
/// Size of the envelope header in bytes.
pub const HEADER_BYTES: usize = 24;
/// Largest payload a compressed entry may expand to, in bytes (64 MiB); a larger one is refused as corrupt.
pub const MAX_DECOMPRESSED_BYTES: usize = 64 << 20;
/// The `fresh for` of an entry without a TTL of its own.
const NO_EXPIRY: u32 = u32::MAX;

const FORMAT_MASK: u8 = 0b0011;
const RAW: u8 = 0;
const JSON: u8 = 1;
const POSTCARD: u8 = 2;
const MSGPACK: u8 = 3;
const ZSTD: u8 = 0b0100;
const NEGATIVE: u8 = 0b1000;

/// The serde format of a key pattern's values (`[cache.patterns.<p>] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MessagePack with fields by name: binary and self-describing (see the module docs).
    #[default]
    #[serde(rename = "msgpack")]
    MessagePack,
    /// postcard: the most compact and fastest; for plain structs of fixed shape only (see the module docs).
    Postcard,
    /// serde_json: readable by other programs.
    Json,
}

impl Format {
    /// The name used in configuration and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::MessagePack => "msgpack",
            Format::Postcard => "postcard",
            Format::Json => "json",
        }
    }

    fn flag(self) -> u8 {
        match self {
            Format::MessagePack => MSGPACK,
            Format::Postcard => POSTCARD,
            Format::Json => JSON,
        }
    }
}

/// How one entry is written: the pattern's format and compression threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encoding {
    /// The serde format (raw byte values ignore it).
    pub format: Format,
    /// Compress payloads longer than this many bytes (feature `zstd`); `None`: never.
    pub compress_above: Option<usize>,
}

/// When an entry was stored and for how long it is fresh: the header's `stored at`, `fresh for` and absence flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch, on the writer's clock.
    pub stored_at_ms: u64,
    /// The TTL in whole seconds (`None`: no expiry of its own).
    pub fresh_for_secs: Option<u32>,
    /// The entry is a cached absence (a loader's "not found").
    pub negative: bool,
}

impl Stamp {
    /// A stamp for a value stored at `now_ms`, fresh for `ttl` (`None`: no expiry).
    pub fn new(now_ms: u64, ttl: Option<Duration>, negative: bool) -> Self {
        Stamp {
            stored_at_ms: now_ms,
            fresh_for_secs: ttl.map(|t| u32::try_from(t.as_secs()).unwrap_or(NO_EXPIRY - 1)),
            negative,
        }
    }

    /// How old the entry is at `now_ms` (0 when the writer's clock was ahead).
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.stored_at_ms))
    }

    /// When the entry stops being fresh, in milliseconds since the Unix epoch.
    fn until_ms(&self) -> Option<u64> {
        Some(
            self.stored_at_ms
                .saturating_add(u64::from(self.fresh_for_secs?) * 1000),
        )
    }

    /// How long past its TTL the entry is at `now_ms`; `None` while it is fresh, or without expiry.
    pub fn stale_by(&self, now_ms: u64) -> Option<Duration> {
        let until = self.until_ms()?;
        (now_ms >= until).then(|| Duration::from_millis(now_ms - until))
    }

    /// Remaining freshness at `now_ms` in whole seconds, negative once stale (the `ttl` of RFC 9211's
    /// `Cache-Status`); `None` without expiry.
    pub fn ttl_secs(&self, now_ms: u64) -> Option<i64> {
        let until = self.until_ms()?;
        let left = i128::from(until) - i128::from(now_ms);
        Some(i64::try_from(left.div_euclid(1000)).unwrap_or(if left < 0 {
            i64::MIN
        } else {
            i64::MAX
        }))
    }
}

/// How a value type is turned into bytes inside the envelope.
pub trait Codec: Sized {
    /// Writes the payload of `self` in `format` into `out`.
    ///
    /// # Errors
    /// The serializer's error, as text.
    fn write_payload(&self, format: Format, out: &mut BytesMut) -> std::result::Result<(), String>;
    /// Reads a value from a payload written in `format` (`None`: raw bytes).
    ///
    /// # Errors
    /// A description of why the payload is not a valid value.
    fn read_payload(format: Option<Format>, payload: Bytes) -> std::result::Result<Self, String>;
    /// The type tag stored in the header.
    fn type_tag() -> u32;
    /// Whether the payload is raw bytes (no serde format).
    fn raw() -> bool {
        false
    }
    /// Size of the payload in `format` in bytes, computed without keeping it (0 if it cannot be encoded).
    fn payload_len(&self, format: Format) -> usize {
        let mut out = BytesMut::new();
        self.write_payload(format, &mut out)
            .map_or(0, |()| out.len())
    }
    /// Whether two values are the same value (shadow mode's comparison): equal as JSON values for serde types, so
    /// that maps serialized in another order still match.
    fn same(&self, other: &Self) -> bool;
}

/// Length of `value`'s encoding in `format`, computed without keeping it (0 if it cannot be encoded).
pub(crate) fn serde_len<T: Serialize + ?Sized>(value: &T, format: Format) -> usize {
    match format {
        Format::Json => {
            let mut c = Counter(0);
            serde_json::to_writer(&mut c, value).map_or(0, |()| c.0)
        }
        Format::Postcard => postcard::to_io(value, Counter(0)).map_or(0, |c| c.0),
        Format::MessagePack => {
            let mut c = Counter(0);
            rmp_serde::encode::write_named(&mut c, value).map_or(0, |()| c.0)
        }
    }
}

/// Writes `value` in `format` into `out`.
pub(crate) fn write_serde<T: Serialize + ?Sized>(
    value: &T,
    format: Format,
    out: &mut BytesMut,
) -> std::result::Result<(), String> {
    match format {
        Format::Json => serde_json::to_writer(out.writer(), value).map_err(|e| e.to_string()),
        // Through `io::Write`: whole slices at a time (`to_extend` into a `BytesMut` pushes byte by byte).
        Format::Postcard => postcard::to_io(value, out.writer())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Format::MessagePack => {
            rmp_serde::encode::write_named(&mut out.writer(), value).map_err(|e| e.to_string())
        }
    }
}

/// A byte counter, as an `io::Write`.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A serde value, written in the pattern's [`Format`].
#[derive(Debug)]
pub struct Serde<T>(pub T);

impl<T: Serialize + DeserializeOwned> Codec for Serde<T> {
    fn write_payload(&self, format: Format, out: &mut BytesMut) -> std::result::Result<(), String> {
        write_serde(&self.0, format, out)
    }
    fn read_payload(format: Option<Format>, payload: Bytes) -> std::result::Result<Self, String> {
        match format {
            Some(Format::Json) => serde_json::from_slice(&payload).map_err(|e| e.to_string()),
            Some(Format::MessagePack) => {
                // Reads in place from the slice (faster than through `io::Read`); the checksum already vouches
                // that the payload is what the writer wrote, trailing bytes included.
                rmp_serde::from_slice(&payload).map_err(|e| e.to_string())
            }
            Some(Format::Postcard) => match postcard::take_from_bytes(&payload) {
                Ok((v, [])) => Ok(v),
                Ok((_, rest)) => Err(format!("{} bytes after the value", rest.len())),
                Err(e) => Err(e.to_string()),
            },
            None => Err("raw bytes, not a serde value".into()),
        }
        .map(Serde)
    }
    fn type_tag() -> u32 {
        fnv1a(std::any::type_name::<T>().as_bytes())
    }
    fn payload_len(&self, format: Format) -> usize {
        serde_len(&self.0, format)
    }
    fn same(&self, other: &Self) -> bool {
        match (
            serde_json::to_value(&self.0),
            serde_json::to_value(&other.0),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl Codec for Bytes {
    fn write_payload(&self, _: Format, out: &mut BytesMut) -> std::result::Result<(), String> {
        out.extend_from_slice(self);
        Ok(())
    }
    fn read_payload(format: Option<Format>, payload: Bytes) -> std::result::Result<Self, String> {
        match format {
            None => Ok(payload),
            Some(f) => Err(format!("{} payload, not raw bytes", f.as_str())),
        }
    }
    fn type_tag() -> u32 {
        fnv1a(b"bytes")
    }
    fn raw() -> bool {
        true
    }
    fn payload_len(&self, _: Format) -> usize {
        self.len()
    }
    fn same(&self, other: &Self) -> bool {
        self == other
    }
}

/// The tag stored for type `C` under the application's `value_version` (0 leaves the type tag as is).
fn tag<C: Codec>(value_version: u32) -> u32 {
    C::type_tag() ^ value_version.wrapping_mul(0x9E37_79B9)
}

/// Encodes `value` into the envelope, in `encoding`, stamped with `stamp`. `value_version` is the application's
/// version of its value formats.
///
/// # Errors
/// [`Error::Encode`] when the serializer fails (for example a map with non-string keys under JSON, or a sequence
/// of unknown length under postcard).
pub fn encode<C: Codec>(
    key: &str,
    value: &C,
    value_version: u32,
    encoding: Encoding,
    stamp: Stamp,
) -> Result<Bytes> {
    let mut out = BytesMut::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.put_u8(VERSION);
    let mut flags = if C::raw() {
        RAW
    } else {
        encoding.format.flag()
    };
    if stamp.negative {
        flags |= NEGATIVE;
    }
    out.put_u8(flags);
    out.put_u32_le(tag::<C>(value_version));
    out.put_u64_le(stamp.stored_at_ms);
    out.put_u32_le(stamp.fresh_for_secs.unwrap_or(NO_EXPIRY));
    out.put_u32_le(0); // CRC placeholder
    value
        .write_payload(encoding.format, &mut out)
        .map_err(|reason| Error::Encode {
            key: key.to_string(),
            reason,
        })?;
    #[cfg(feature = "zstd")]
    if let Some(limit) = encoding.compress_above {
        let payload = &out[HEADER_BYTES..];
        if payload.len() > limit && payload.len() <= MAX_DECOMPRESSED_BYTES {
            if let Ok(small) = zstd::bulk::compress(payload, 3) {
                if small.len() < payload.len() {
                    out.truncate(HEADER_BYTES);
                    out.extend_from_slice(&small);
                    out[3] |= ZSTD;
                }
            }
        }
    }
    let crc = checksum(&out[..20], &out[HEADER_BYTES..]);
    out[20..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(out.freeze())
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
}

/// The stamp of an envelope of this format version, read from its header without checking the payload (the
/// registry's freshness decisions; [`decode`] checks everything). `None`: not an envelope of this version.
pub fn stamp(bytes: &[u8]) -> Option<Stamp> {
    if bytes.len() < HEADER_BYTES || &bytes[0..2] != MAGIC || bytes[2] != VERSION {
        return None;
    }
    let fresh = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[8..16]);
    Some(Stamp {
        stored_at_ms: u64::from_le_bytes(at),
        fresh_for_secs: (fresh != NO_EXPIRY).then_some(fresh),
        negative: bytes[3] & NEGATIVE != 0,
    })
}

/// Whether `bytes` is an entry this build does not read although nothing is wrong with it: another envelope
/// version, another type or value version (`value_version`), or a compressed entry without the `zstd` feature, as
/// written by another version of the application during a rolling deploy. The registry takes such an entry as a
/// plain miss and replaces it, without counting an error or deleting it first.
pub fn foreign<C: Codec>(bytes: &[u8], value_version: u32) -> bool {
    if bytes.len() < 3 || &bytes[0..2] != MAGIC {
        return false;
    }
    if bytes[2] != VERSION {
        return true;
    }
    if bytes.len() < HEADER_BYTES {
        return false;
    }
    let tag = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    tag != self::tag::<C>(value_version) || (bytes[3] & ZSTD != 0 && !cfg!(feature = "zstd"))
}

/// Decodes an envelope written with the same `value_version`.
///
/// # Errors
/// [`Error::Corrupt`] saying which check failed: length, magic, version, type (or value version), checksum,
/// compression or payload.
pub fn decode<C: Codec>(bytes: Bytes, value_version: u32) -> Result<C> {
    if bytes.len() < HEADER_BYTES {
        return Err(Error::Corrupt(format!(
            "{} bytes, shorter than the header",
            bytes.len()
        )));
    }
    if &bytes[0..2] != MAGIC {
        return Err(Error::Corrupt("bad magic".into()));
    }
    if bytes[2] != VERSION {
        return Err(Error::Corrupt(format!(
            "format version {} (expected {VERSION})",
            bytes[2]
        )));
    }
    let tag = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if tag != self::tag::<C>(value_version) {
        return Err(Error::Corrupt(
            "stored for another type or value version".into(),
        ));
    }
    let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if checksum(&bytes[..20], &bytes[HEADER_BYTES..]) != crc {
        return Err(Error::Corrupt("checksum mismatch".into()));
    }
    let flags = bytes[3];
    if flags & !(FORMAT_MASK | ZSTD | NEGATIVE) != 0 {
        return Err(Error::Corrupt(format!("unknown flags {flags:#04x}")));
    }
    let format = match flags & FORMAT_MASK {
        RAW => None,
        JSON => Some(Format::Json),
        POSTCARD => Some(Format::Postcard),
        _ => Some(Format::MessagePack),
    };
    let payload = bytes.slice(HEADER_BYTES..);
    let payload = if flags & ZSTD != 0 {
        decompress(&payload)?
    } else {
        payload
    };
    C::read_payload(format, payload).map_err(Error::Corrupt)
}

/// Decompresses a zstd frame into exactly its declared size, refused when it declares none or more than
/// [`MAX_DECOMPRESSED_BYTES`].
#[cfg(feature = "zstd")]
fn decompress(payload: &[u8]) -> Result<Bytes> {
    let size = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= MAX_DECOMPRESSED_BYTES as u64 => n as usize,
        Ok(Some(n)) => {
            return Err(Error::Corrupt(format!(
                "zstd: declares {n} bytes, over {MAX_DECOMPRESSED_BYTES}"
            )))
        }
        _ => return Err(Error::Corrupt("zstd: no content size".into())),
    };
    let out =
        zstd::bulk::decompress(payload, size).map_err(|e| Error::Corrupt(format!("zstd: {e}")))?;
    if out.len() != size {
        return Err(Error::Corrupt("zstd: shorter than declared".into()));
    }
    Ok(Bytes::from(out))
}

#[cfg(not(feature = "zstd"))]
fn decompress(_payload: &[u8]) -> Result<Bytes> {
    Err(Error::Corrupt(
        "zstd-compressed, and this build has no `zstd` feature".into(),
    ))
}

/// Whether the cached envelope `cached` holds the same value as `value` (shadow mode): it decodes as `C` and the
/// two values are [`Codec::same`]. Written at another time, in another format or compressed, it may still match.
pub fn same_value<C: Codec>(cached: &Bytes, value: &C, value_version: u32) -> bool {
    decode::<C>(cached.clone(), value_version).is_ok_and(|c| c.same(value))
}

/// FNV-1a, 32-bit (Fowler, Noll, Vo; <http://www.isthe.com/chongo/tech/comp/fnv/>).
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Property tests (proptest, 256 cases each, run by `cargo test`).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// What the encoder wrote decodes to the same value; any one byte changed, or any truncation, is refused
        /// (a miss), never another value.
        #[test]
        fn only_what_the_encoder_wrote_decodes(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            version in any::<u32>(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let value = Bytes::from(payload);
            let bytes = encode("k", &value, version, Encoding::default(), STAMP).expect("bytes encode");
            prop_assert_eq!(decode::<Bytes>(bytes.clone(), version).expect("round trip"), value);
            let mut changed = bytes.to_vec();
            let i = at.index(changed.len());
            changed[i] ^= flip;
            prop_assert!(decode::<Bytes>(Bytes::from(changed), version).is_err(), "byte {} changed", i);
            let shorter = cut.index(bytes.len());
            prop_assert!(decode::<Bytes>(bytes.slice(..shorter), version).is_err(), "cut at {}", shorter);
        }

        /// Arbitrary bytes never panic the decoder, and are refused unless they carry a valid envelope.
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Bytes>(Bytes::from(raw.clone()), 0);
            let _ = decode::<Serde<serde_json::Value>>(Bytes::from(raw), 0);
        }
    }
}

#[cfg(test)]
const STAMP: Stamp = Stamp {
    stored_at_ms: 1_700_000_000_000,
    fresh_for_secs: Some(60),
    negative: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    fn user() -> User {
        User {
            id: 7,
            name: "Ada".repeat(200),
            tags: vec!["admin".into(); 20],
        }
    }

    fn encodings() -> Vec<Encoding> {
        let mut all = Vec::new();
        for format in [Format::MessagePack, Format::Postcard, Format::Json] {
            for compress_above in [None, Some(64)] {
                all.push(Encoding {
                    format,
                    compress_above,
                });
            }
        }
        all
    }

    #[test]
    fn every_format_round_trips_and_reads_whatever_format_was_written() {
        for enc in encodings() {
            let b = encode("user:7", &Serde(user()), 0, enc, STAMP).expect("encodes");
            let Serde(back) = decode::<Serde<User>>(b.clone(), 0).expect("decodes");
            assert_eq!(back, user(), "{enc:?}");
            assert_eq!(stamp(&b), Some(STAMP));
            assert_eq!(b[3] & FORMAT_MASK, enc.format.flag());
            #[cfg(feature = "zstd")]
            assert_eq!(b[3] & ZSTD != 0, enc.compress_above.is_some(), "{enc:?}");
        }
        let compact = encode("k", &Serde(user()), 0, Encoding::default(), STAMP).expect("encodes");
        let json = encode(
            "k",
            &Serde(user()),
            0,
            Encoding {
                format: Format::Json,
                compress_above: None,
            },
            STAMP,
        )
        .expect("encodes");
        assert!(
            compact.len() < json.len(),
            "MessagePack is the smaller of the two here"
        );
    }

    /// What postcard cannot carry, MessagePack (the default) round-trips: `deserialize_any` (JSON values, untagged
    /// enums, flattened fields) and fields skipped on write.
    #[test]
    fn the_default_format_round_trips_what_serde_expresses() {
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(untagged)]
        enum Id {
            Number(u64),
            Name(String),
        }
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Doc {
            #[serde(skip_serializing_if = "Option::is_none", default)]
            a: Option<u8>,
            b: Option<Vec<u8>>,
            id: Id,
            extra: serde_json::Value,
            #[serde(flatten)]
            rest: std::collections::BTreeMap<String, u32>,
        }
        let doc = Doc {
            a: None,
            b: Some(vec![0]),
            id: Id::Name("x".into()),
            extra: serde_json::json!({"k": [1, "two", null]}),
            rest: [("r".to_string(), 3)].into(),
        };
        let b = encode("k", &Serde(doc.clone()), 0, Encoding::default(), STAMP).expect("encodes");
        let Serde(back) = decode::<Serde<Doc>>(b, 0).expect("decodes");
        assert_eq!(back, doc);
    }

    /// A type that gained a defaulted field still reads its older entries under the default format.
    #[test]
    fn an_added_defaulted_field_reads_older_entries() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct V1 {
            id: u64,
        }
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct V2 {
            id: u64,
            #[serde(default)]
            name: String,
        }
        let payload = {
            let mut out = BytesMut::new();
            write_serde(&V1 { id: 4 }, Format::MessagePack, &mut out).expect("encodes");
            out.freeze()
        };
        let v2 =
            <Serde<V2> as Codec>::read_payload(Some(Format::MessagePack), payload).expect("reads");
        assert_eq!(
            v2.0,
            V2 {
                id: 4,
                name: String::new()
            }
        );
    }

    #[test]
    fn entries_of_another_version_type_or_value_version_are_foreign_not_corrupt() {
        let b = encode("k", &Serde(5u64), 0, Encoding::default(), STAMP).expect("encodes");
        assert!(!foreign::<Serde<u64>>(&b, 0));
        assert!(foreign::<Serde<u64>>(&b, 1), "another value version");
        assert!(foreign::<Serde<i64>>(&b, 0), "another type");
        let mut v1 = b.to_vec();
        v1[2] = 1;
        assert!(foreign::<Serde<u64>>(&v1, 0), "another envelope version");
        let mut flipped = b.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(
            !foreign::<Serde<u64>>(&flipped, 0),
            "damage is corruption, not foreign"
        );
        assert!(!foreign::<Serde<u64>>(
            b"not ours at all, longer than a header",
            0
        ));
    }

    #[test]
    fn any_flipped_byte_is_detected_in_every_format() {
        for enc in encodings() {
            let b = encode("user:7", &Serde(user()), 0, enc, STAMP).expect("encodes");
            for i in 0..b.len() {
                let mut v = b.to_vec();
                v[i] ^= 0x01;
                assert!(
                    decode::<Serde<User>>(Bytes::from(v), 0).is_err(),
                    "{enc:?}: flip at byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn other_type_or_version_is_rejected() {
        let b = encode("k", &Serde(5u64), 0, Encoding::default(), STAMP).expect("encodes");
        assert!(decode::<Serde<i64>>(b.clone(), 0).is_err());
        assert!(
            decode::<Serde<u64>>(b.clone(), 1).is_err(),
            "another value version is a miss"
        );
        let seven = encode("k", &Serde(5u64), 7, Encoding::default(), STAMP).expect("encodes");
        assert!(decode::<Serde<u64>>(seven, 7).is_ok());
        let mut v = b.to_vec();
        v[2] = 3;
        let e = decode::<Serde<u64>>(Bytes::from(v), 0).expect_err("other version");
        assert!(e.to_string().contains("version"));
    }

    /// An entry written by the previous envelope (format version 1: magic, version, tag, CRC, JSON payload) is a
    /// miss, never read as a value.
    #[test]
    fn an_entry_of_format_version_1_is_a_miss() {
        let value = "a value long enough to fill the new header".to_string();
        let payload = serde_json::to_vec(&value).expect("json");
        let mut v1 = b"CR\x01".to_vec();
        v1.extend_from_slice(&<Serde<String> as Codec>::type_tag().to_le_bytes());
        v1.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        v1.extend_from_slice(&payload);
        let e = decode::<Serde<String>>(Bytes::from(v1.clone()), 0).expect_err("a miss");
        assert!(e.to_string().contains("format version 1"), "{e}");
        assert_eq!(stamp(&v1), None);
    }

    #[test]
    fn raw_bytes_are_not_read_as_a_serde_value_nor_the_reverse() {
        let raw = encode(
            "k",
            &Bytes::from_static(b"\x05"),
            0,
            Encoding::default(),
            STAMP,
        )
        .expect("encodes");
        assert!(decode::<Bytes>(raw, 0).is_ok());
        let typed = encode("k", &Serde(5u8), 0, Encoding::default(), STAMP).expect("encodes");
        assert!(decode::<Bytes>(typed, 0).is_err());
    }

    #[test]
    fn stamps_say_fresh_stale_and_ttl() {
        let s = Stamp::new(10_000, Some(Duration::from_secs(5)), false);
        assert_eq!(s.stale_by(14_999), None);
        assert_eq!(s.stale_by(15_000), Some(Duration::ZERO));
        assert_eq!(s.stale_by(17_500), Some(Duration::from_millis(2_500)));
        assert_eq!(s.age(12_000), Duration::from_secs(2));
        assert_eq!(s.age(9_000), Duration::ZERO, "a writer ahead of us");
        assert_eq!(s.ttl_secs(12_000), Some(3));
        assert_eq!(s.ttl_secs(17_500), Some(-3));
        let forever = Stamp::new(10_000, None, true);
        assert_eq!(forever.stale_by(u64::MAX), None);
        assert_eq!(forever.ttl_secs(0), None);
        let b = encode("k", &Serde(()), 0, Encoding::default(), forever).expect("encodes");
        assert_eq!(stamp(&b), Some(forever));
    }

    #[test]
    fn shadow_comparison_ignores_the_stamp_and_the_format() {
        let a = encode("k", &Serde(user()), 0, Encoding::default(), STAMP).expect("encodes");
        assert!(same_value(&a, &Serde(user()), 0));
        let mut other = user();
        other.id = 8;
        assert!(!same_value(&a, &Serde(other), 0));
        let map: std::collections::HashMap<String, u32> =
            (0..50).map(|i| (format!("k{i}"), i)).collect();
        let b = encode("k", &Serde(map.clone()), 0, Encoding::default(), STAMP).expect("encodes");
        let mut pairs: Vec<(String, u32)> = map.into_iter().collect();
        pairs.reverse();
        let rebuilt: std::collections::HashMap<String, u32> = pairs.into_iter().collect();
        assert!(same_value(&b, &Serde(rebuilt), 0));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_rejected() {
        assert!(decode::<Bytes>(Bytes::from_static(b"CR"), 0).is_err());
        assert!(
            decode::<Bytes>(Bytes::from_static(b"hello world, not ours, quite long"), 0).is_err()
        );
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn a_compressed_bomb_is_refused_not_allocated() {
        let huge = vec![0u8; MAX_DECOMPRESSED_BYTES + 1];
        let small = zstd::bulk::compress(&huge, 3).expect("compresses");
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&small)
                .ok()
                .flatten(),
            Some(huge.len() as u64),
            "zstd declares the size"
        );
        let mut out = BytesMut::new();
        out.extend_from_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(RAW | ZSTD);
        out.put_u32_le(tag::<Bytes>(0));
        out.put_u64_le(0);
        out.put_u32_le(NO_EXPIRY);
        out.put_u32_le(0);
        out.extend_from_slice(&small);
        let crc = checksum(&out[..20], &out[HEADER_BYTES..]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        let e = decode::<Bytes>(out.freeze(), 0).expect_err("refused");
        assert!(e.to_string().contains("zstd"), "{e}");
    }
}
