//! The envelope's formats compared: encode and decode time, and bytes per value, of JSON, MessagePack (the default)
//! and postcard, with and without zstd (above 256 bytes), on the reference service's values (a user, a project, a
//! member list of 5) and on a 4 KiB value. Run: `cargo bench --bench codec` (the sizes are printed first; `docs/performance.md` has the figures).

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use cache_rollout::codec::{decode, encode, Encoding, Format, Serde, Stamp};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The reference service's values (`src/bin/cache-rollout/catalog.rs`), as seeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: i64,
    name: String,
    email: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Project {
    id: i64,
    name: String,
    owner_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    user_id: i64,
    name: String,
    role: String,
}

/// A 4 KiB value (in JSON): an order with its lines, the shape of a typical API response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    status: String,
    created_at: u64,
    lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    sku: String,
    description: String,
    quantity: u32,
    unit_price_cents: u64,
}

fn order() -> Order {
    Order {
        id: 982_451_653,
        customer: "customer-000412".into(),
        status: "shipped".into(),
        created_at: 1_764_633_600,
        lines: (0..34)
            .map(|i| Line {
                sku: format!("SKU-{:06}", 104_729 * i % 1_000_000),
                description: format!("Item {i}: stainless steel part, size {}", i % 7),
                quantity: 1 + i % 5,
                unit_price_cents: 1_299 + 37 * u64::from(i),
            })
            .collect(),
    }
}

const STAMP: Stamp = Stamp {
    stored_at_ms: 1_764_633_600_000,
    fresh_for_secs: Some(300),
    negative: false,
};

fn encodings() -> [(&'static str, Encoding); 6] {
    let e = |format, compress_above| Encoding {
        format,
        compress_above,
    };
    [
        ("json", e(Format::Json, None)),
        ("msgpack", e(Format::MessagePack, None)),
        ("postcard", e(Format::Postcard, None)),
        ("json_zstd", e(Format::Json, Some(256))),
        ("msgpack_zstd", e(Format::MessagePack, Some(256))),
        ("postcard_zstd", e(Format::Postcard, Some(256))),
    ]
}

fn bench_value<T>(c: &mut Criterion, name: &str, value: T)
where
    T: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug,
{
    let mut g = c.benchmark_group(format!("codec_{name}"));
    for (label, enc) in encodings() {
        let v = Serde(value.clone());
        let bytes: Bytes = encode("k", &v, 0, enc, STAMP).expect("encodes");
        let Serde(back) = decode::<Serde<T>>(bytes.clone(), 0).expect("decodes");
        assert_eq!(back, value);
        eprintln!(
            "size {name} {label}: {} bytes (envelope included)",
            bytes.len()
        );
        g.bench_with_input(BenchmarkId::new("encode", label), &v, |b, v| {
            b.iter(|| encode("k", black_box(v), 0, enc, STAMP).expect("encodes"))
        });
        g.bench_with_input(BenchmarkId::new("decode", label), &bytes, |b, bytes| {
            b.iter(|| decode::<Serde<T>>(black_box(bytes.clone()), 0).expect("decodes"))
        });
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    bench_value(
        c,
        "user",
        User {
            id: 417,
            name: "User 417".into(),
            email: "user417@example.com".into(),
        },
    );
    bench_value(
        c,
        "project",
        Project {
            id: 41,
            name: "Project 41".into(),
            owner_id: 411,
        },
    );
    let roles = ["owner", "maintainer", "viewer", "viewer", "viewer"];
    bench_value(
        c,
        "members",
        (0..5)
            .map(|k| Member {
                user_id: 400 + k,
                name: format!("User {}", 400 + k),
                role: roles[k as usize].into(),
            })
            .collect::<Vec<_>>(),
    );
    bench_value(c, "order_4k", order());
}

criterion_group!(benches, codec);
criterion_main!(benches);
