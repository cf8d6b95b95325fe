//! The versioned envelope every cached value is stored in.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "CR"
//! 2       1     format version (1)
//! 3       4     type tag: FNV-1a (32-bit) of the Rust type name, mixed with the application's value version
//! 7       4     CRC-32 (IEEE) of the payload, little endian
//! 11      n     payload: serde_json of the value, or the raw bytes for byte values
//! ```
//!
//! A value written by another format version, for another type, or damaged in any byte fails [`decode`] with
//! [`Error::Corrupt`]; the registry then treats it as a miss and deletes it, so a format change or a corrupted entry
//! is never served and never panics.

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

const MAGIC: &[u8; 2] = b"CR";
const VERSION: u8 = 1;
/// Size of the envelope header in bytes.
pub const HEADER_BYTES: usize = 11;

/// How a value type is turned into bytes inside the envelope.
pub trait Codec: Sized {
    /// Writes the payload of `self` into `out`.
    ///
    /// # Errors
    /// The serializer's error.
    fn write_payload(&self, out: &mut BytesMut) -> std::result::Result<(), serde_json::Error>;
    /// Reads a value from a payload.
    ///
    /// # Errors
    /// A description of why the payload is not a valid value.
    fn read_payload(payload: Bytes) -> std::result::Result<Self, String>;
    /// The type tag stored in the header.
    fn type_tag() -> u32;
    /// Size of the payload in bytes, computed without keeping it (0 if it cannot be encoded).
    fn payload_len(&self) -> usize {
        let mut out = BytesMut::new();
        self.write_payload(&mut out).map_or(0, |()| out.len())
    }
}

/// Length of `value`'s serde_json encoding in bytes, computed without keeping it (0 if it cannot be encoded).
pub(crate) fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut c = Counter(0);
    serde_json::to_writer(&mut c, value).map_or(0, |()| c.0)
}

/// An `io::Write` that only counts.
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

/// Values encoded with serde_json.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: Serialize + DeserializeOwned> Codec for Json<T> {
    fn write_payload(&self, out: &mut BytesMut) -> std::result::Result<(), serde_json::Error> {
        serde_json::to_writer(out.writer(), &self.0)
    }
    fn read_payload(payload: Bytes) -> std::result::Result<Self, String> {
        serde_json::from_slice(&payload)
            .map(Json)
            .map_err(|e| e.to_string())
    }
    fn type_tag() -> u32 {
        fnv1a(std::any::type_name::<T>().as_bytes())
    }
    fn payload_len(&self) -> usize {
        json_len(&self.0)
    }
}

impl Codec for Bytes {
    fn write_payload(&self, out: &mut BytesMut) -> std::result::Result<(), serde_json::Error> {
        out.extend_from_slice(self);
        Ok(())
    }
    fn read_payload(payload: Bytes) -> std::result::Result<Self, String> {
        Ok(payload)
    }
    fn type_tag() -> u32 {
        fnv1a(b"bytes")
    }
    fn payload_len(&self) -> usize {
        self.len()
    }
}

/// The tag stored for type `C` under the application's `value_version` (0 leaves the type tag as is).
fn tag<C: Codec>(value_version: u32) -> u32 {
    C::type_tag() ^ value_version.wrapping_mul(0x9E37_79B9)
}

/// Encodes `value` into the envelope. `value_version` is the application's version of its value formats.
///
/// # Errors
/// [`Error::Encode`] when the serializer fails (for example a map with non-string keys).
pub fn encode<C: Codec>(key: &str, value: &C, value_version: u32) -> Result<Bytes> {
    let mut out = BytesMut::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u32_le(tag::<C>(value_version));
    out.put_u32_le(0); // CRC placeholder
    value
        .write_payload(&mut out)
        .map_err(|source| Error::Encode {
            key: key.to_string(),
            source,
        })?;
    let crc = crc32fast::hash(&out[HEADER_BYTES..]);
    out[7..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(out.freeze())
}

/// Decodes an envelope written with the same `value_version`.
///
/// # Errors
/// [`Error::Corrupt`] saying which check failed: length, magic, version, type (or value version), checksum or
/// payload.
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
    let tag = u32::from_le_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]);
    if tag != self::tag::<C>(value_version) {
        return Err(Error::Corrupt(
            "stored for another type or value version".into(),
        ));
    }
    let crc = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]);
    let payload = bytes.slice(HEADER_BYTES..);
    if crc32fast::hash(&payload) != crc {
        return Err(Error::Corrupt("checksum mismatch".into()));
    }
    C::read_payload(payload).map_err(Error::Corrupt)
}

/// Whether two envelopes hold the same value: the same bytes, or the same header and payloads that parse to equal
/// JSON values (so that maps serialized in another order still match). Used by shadow mode.
pub fn same_value(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    if a.len() < HEADER_BYTES || b.len() < HEADER_BYTES || a[..7] != b[..7] {
        return false;
    }
    match (
        serde_json::from_slice::<serde_json::Value>(&a[HEADER_BYTES..]),
        serde_json::from_slice::<serde_json::Value>(&b[HEADER_BYTES..]),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
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
            let bytes = encode("k", &value, version).expect("bytes encode");
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
            let _ = decode::<Json<serde_json::Value>>(Bytes::from(raw), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    fn user() -> User {
        User {
            id: 7,
            name: "Ada".into(),
        }
    }

    #[test]
    fn json_value_round_trips() {
        let b = encode("user:7", &Json(user()), 0).expect("encodes");
        let Json(back) = decode::<Json<User>>(b, 0).expect("decodes");
        assert_eq!(back, user());
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let b = encode("user:7", &Json(user()), 0).expect("encodes");
        for i in 0..b.len() {
            let mut v = b.to_vec();
            v[i] ^= 0x01;
            assert!(
                decode::<Json<User>>(Bytes::from(v), 0).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn other_type_or_version_is_rejected() {
        let b = encode("k", &Json(5u64), 0).expect("encodes");
        assert!(decode::<Json<i64>>(b.clone(), 0).is_err());
        assert!(
            decode::<Json<u64>>(b.clone(), 1).is_err(),
            "another value version is a miss"
        );
        assert!(decode::<Json<u64>>(encode("k", &Json(5u64), 7).expect("encodes"), 7).is_ok());
        let mut v = b.to_vec();
        v[2] = 2;
        let e = decode::<Json<u64>>(Bytes::from(v), 0).expect_err("other version");
        assert!(e.to_string().contains("version"));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_rejected() {
        assert!(decode::<Bytes>(Bytes::from_static(b"CR"), 0).is_err());
        assert!(decode::<Bytes>(Bytes::from_static(b"hello world, not ours"), 0).is_err());
    }
}
