//! The trace formats and how one line (or record) of each becomes a [`TraceRequest`].

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A trace file format. `docs/analysis.md` ("Trace formats") says which column means what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceFormat {
    /// Twitter's cache-trace CSV (<https://github.com/twitter/cache-trace>): no header, seven columns
    /// `timestamp,key,key_size,value_size,client_id,operation,ttl`. Keys carry their own key pattern.
    Twitter,
    /// ARC `.lis` (Megiddo and Modha, FAST 2003): `START_BLOCK N_BLOCKS IGNORED REQUEST_NUMBER`; a get of
    /// `START_BLOCK` whose value is `512 × N_BLOCKS` bytes. No timestamps.
    Arc,
    /// The CloudPhysics block I/O CSV of libCacheSim's sample data: header `version,time,op,size,lbn`; `time` in
    /// seconds, `op` the SCSI opcode in hex (`28` read → get, `2a` write → invalidation), `size` in bytes, `lbn` the
    /// object id.
    CloudPhysics,
    /// libCacheSim's `oracleGeneral` binary: 24-byte little-endian records `u32 timestamp (s), u64 object id,
    /// u32 object size (bytes), i64 next access (ignored)`; every record a get.
    OracleGeneral,
    /// A CSV whose columns a [`CsvSpec`] names (libCacheSim's `csv` trace type and its `-t` parameters).
    Csv,
}

impl TraceFormat {
    /// Every format.
    pub const ALL: [TraceFormat; 5] = [
        TraceFormat::Twitter,
        TraceFormat::Arc,
        TraceFormat::CloudPhysics,
        TraceFormat::OracleGeneral,
        TraceFormat::Csv,
    ];

    /// The name `--format` takes: `twitter`, `arc`, `cloudphysics`, `oracle-general`, `csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            TraceFormat::Twitter => "twitter",
            TraceFormat::Arc => "arc",
            TraceFormat::CloudPhysics => "cloudphysics",
            TraceFormat::OracleGeneral => "oracle-general",
            TraceFormat::Csv => "csv",
        }
    }

    /// The key pattern given to the numeric object ids of this format (keys `<pattern>:<id>`) when none is
    /// configured: `arc`, `cloudphysics`, `oracle`, `csv`. `None` for Twitter, whose keys carry their own.
    pub fn default_pattern(self) -> Option<&'static str> {
        match self {
            TraceFormat::Twitter => None,
            TraceFormat::Arc => Some("arc"),
            TraceFormat::CloudPhysics => Some("cloudphysics"),
            TraceFormat::OracleGeneral => Some("oracle"),
            TraceFormat::Csv => Some("csv"),
        }
    }

    /// Whether requests of this format carry a timestamp (what `--ttl` needs).
    pub fn has_timestamps(self) -> bool {
        !matches!(self, TraceFormat::Arc)
    }

    /// Recognises the format from the first bytes of the (decompressed) content: bytes that are not text
    /// (a NUL, or invalid UTF-8 in the first line) are `oracleGeneral`; the header `version,time,op,size,lbn` is
    /// CloudPhysics; a first line that parses as Twitter or as ARC is that. `None` otherwise, and for a generic CSV,
    /// which needs its [`CsvSpec`].
    pub fn detect(head: &[u8]) -> Option<Self> {
        if head.is_empty() {
            return None;
        }
        let first_line = head.split(|&b| b == b'\n').next().unwrap_or(head);
        // A character cut by the end of `head` (no newline in it) is still text.
        let text_line = match std::str::from_utf8(first_line) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        };
        if head.contains(&0) || !text_line {
            return Some(TraceFormat::OracleGeneral);
        }
        let text = String::from_utf8_lossy(head);
        let first = text
            .lines()
            .map(|l| l.trim_start_matches('\u{FEFF}'))
            .find(|l| !l.trim().is_empty())?;
        if first.trim().eq_ignore_ascii_case(CLOUDPHYSICS_HEADER) {
            return Some(TraceFormat::CloudPhysics);
        }
        let keys = Keys::new(TraceFormat::Arc, None);
        [TraceFormat::Twitter, TraceFormat::Arc]
            .into_iter()
            .find(|&f| parse_text_line(f, first, &CsvSpec::default(), &keys).is_ok())
    }
}

impl fmt::Display for TraceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TraceFormat {
    type Err = Error;

    /// # Errors
    /// [`Error::Config`] for a name that is not one of [`as_str`](TraceFormat::as_str)'s.
    fn from_str(s: &str) -> Result<Self, Error> {
        TraceFormat::ALL
            .into_iter()
            .find(|f| {
                f.as_str().eq_ignore_ascii_case(s)
                    || (s == "oracleGeneral" && *f == TraceFormat::OracleGeneral)
            })
            .ok_or_else(|| {
                Error::config(
                    "--format",
                    s,
                    "must be one of twitter, arc, cloudphysics, oracle-general, csv",
                )
            })
    }
}

pub(crate) const CLOUDPHYSICS_HEADER: &str = "version,time,op,size,lbn";

/// Size of one `oracleGeneral` record in bytes.
pub(crate) const ORACLE_RECORD_BYTES: usize = 24;

/// What a trace request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read (cache-aside get).
    Get,
    /// A write of a new value.
    Set,
    /// A delete or an in-place change: invalidates.
    Delete,
}

impl Op {
    /// The operation a trace's word or code names: `get`, `gets`, `read`, `r`, and the SCSI READ opcodes `08`,
    /// `28`, `88`, `a8` → get; `set`, `add`, `replace`, `cas`, `append`, `prepend` → set; `delete`, `del`, `incr`,
    /// `decr`, `write`, `w`, and the SCSI WRITE opcodes `0a`, `2a`, `8a`, `aa` → delete (a write to the origin
    /// invalidates the cached copy). Case is ignored.
    pub fn from_word(word: &str) -> Option<Op> {
        // The lower-case words of Twitter's traces, without the case-insensitive search below.
        match word {
            "get" | "gets" | "28" => return Some(Op::Get),
            "set" => return Some(Op::Set),
            "delete" => return Some(Op::Delete),
            _ => {}
        }
        let w = word.trim();
        let is = |s: &str| w.eq_ignore_ascii_case(s);
        if ["get", "gets", "read", "r", "08", "28", "88", "a8"]
            .into_iter()
            .any(is)
        {
            Some(Op::Get)
        } else if ["set", "add", "replace", "cas", "append", "prepend"]
            .into_iter()
            .any(is)
        {
            Some(Op::Set)
        } else if [
            "delete", "del", "incr", "decr", "write", "w", "0a", "2a", "8a", "aa",
        ]
        .into_iter()
        .any(is)
        {
            Some(Op::Delete)
        } else {
            None
        }
    }
}

/// Largest value size a trace line may give, in bytes (64 MiB); larger sizes make the line malformed.
pub const MAX_TRACE_VALUE_BYTES: usize = 64 << 20;

fn checked_size(size: Option<usize>, what: &str) -> Result<usize, String> {
    match size {
        Some(n) if n <= MAX_TRACE_VALUE_BYTES => Ok(n),
        _ => Err(format!("{what} exceeds {MAX_TRACE_VALUE_BYTES} bytes")),
    }
}

/// One parsed trace request.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Seconds as the trace gives them (`None` for ARC, which has no time). The replay measures time from the
    /// first request's timestamp.
    pub timestamp: Option<f64>,
    /// Cache key.
    pub key: String,
    /// Operation.
    pub op: Op,
    /// Value size in bytes.
    pub value_size: usize,
}

/// The columns of a generic CSV trace, in libCacheSim's terms (its `-t "time-col=1, obj-id-col=2, …"`), columns
/// counted from 1.
///
/// Parsed from `time-col=N,obj-id-col=N,obj-size-col=N,op-col=N,delimiter=C,has-header=true|false`; only
/// `obj-id-col` is required. As in libCacheSim, names ignore case and take `_` for `-`, `size-col` means
/// `obj-size-col`, booleans may be `yes`/`no`/`1`/`0`, and `delimiter=\,` is a comma. `delimiter` is one character, or `comma`, `tab`, `space`; `obj-id-is-num` is accepted
/// and ignored (ids are read as text). Without `obj-size-col` every value is
/// [`DEFAULT_CSV_VALUE_BYTES`] long; without `op-col` every request is a get; without `time-col` there are no
/// timestamps.
///
/// ```
/// use cache_rollout::replay::CsvSpec;
/// let spec: CsvSpec = "time-col=2, obj-id-col=5, obj-size-col=4, op-col=3, has-header=true".parse().unwrap();
/// assert_eq!(spec.obj_id_col, 5);
/// assert!("obj-size-col=4".parse::<CsvSpec>().is_err()); // no obj-id-col
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CsvSpec {
    /// Column of the timestamp in seconds (1-based), if any.
    pub time_col: Option<usize>,
    /// Column of the object id (1-based).
    pub obj_id_col: usize,
    /// Column of the object size in bytes (1-based), if any.
    pub obj_size_col: Option<usize>,
    /// Column of the operation (1-based; words as [`Op::from_word`] reads them), if any.
    pub op_col: Option<usize>,
    /// Column separator.
    pub delimiter: char,
    /// Whether the first line is a header to skip.
    pub has_header: bool,
}

/// Value size, in bytes, of requests of a CSV trace without an `obj-size-col`.
pub const DEFAULT_CSV_VALUE_BYTES: usize = 1;

impl Default for CsvSpec {
    /// The CloudPhysics columns: `time-col=2, obj-id-col=5, obj-size-col=4, op-col=3, has-header=true`.
    fn default() -> Self {
        CsvSpec {
            time_col: Some(2),
            obj_id_col: 5,
            obj_size_col: Some(4),
            op_col: Some(3),
            delimiter: ',',
            has_header: true,
        }
    }
}

impl FromStr for CsvSpec {
    type Err = Error;

    /// # Errors
    /// [`Error::Config`] (key `--csv-spec`) naming the part that is wrong.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::config("--csv-spec", s, reason);
        let mut spec = CsvSpec {
            time_col: None,
            obj_id_col: 0,
            obj_size_col: None,
            op_col: None,
            delimiter: ',',
            has_header: false,
        };
        // `delimiter=,` holds the separator of the list itself: read it first.
        let mut rest = s.to_string();
        for comma in ["delimiter=\\,", "delimiter=,"] {
            if let Some(at) = rest.find(comma) {
                spec.delimiter = ',';
                rest.replace_range(at..at + comma.len(), "");
            }
        }
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not name=value")))?;
            let value = value.trim();
            let col = || -> Result<usize, Error> {
                match value.parse::<usize>() {
                    Ok(n) if (1..=1024).contains(&n) => Ok(n),
                    _ => Err(bad(format!("{name} must be a column number from 1"))),
                }
            };
            // As libCacheSim reads them: names case-insensitive, `_` for `-`, `size-col` for `obj-size-col`.
            match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "time-col" => spec.time_col = Some(col()?),
                "obj-id-col" => spec.obj_id_col = col()?,
                "obj-size-col" | "size-col" => spec.obj_size_col = Some(col()?),
                "op-col" => spec.op_col = Some(col()?),
                "has-header" | "header" => {
                    spec.has_header = match value.to_ascii_lowercase().as_str() {
                        "true" | "yes" | "1" => true,
                        "false" | "no" | "0" => false,
                        _ => return Err(bad(format!("{name} must be true or false"))),
                    }
                }
                "obj-id-is-num" => {}
                "delimiter" => {
                    spec.delimiter = match value {
                        "comma" => ',',
                        "tab" | "\\t" => '\t',
                        "space" => ' ',
                        v if v.chars().count() == 1 => v.chars().next().unwrap_or(','),
                        _ => return Err(bad("delimiter must be one character, comma, tab or space".into())),
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (time-col, obj-id-col, obj-size-col, op-col, delimiter, has-header)"
                    )))
                }
            }
        }
        if spec.obj_id_col == 0 {
            return Err(bad("obj-id-col is required".into()));
        }
        Ok(spec)
    }
}

/// How object ids become keys, all under one key pattern unless an id carries its own: `<pattern>:<id>` for a
/// numeric id; `<pattern>:<XXH3-64 of the id>` for any other id without `:` (hex hashes, names), so that the
/// registry's key → pattern rule gives `pattern` for each; an id with `:` is a key as it is, with its own pattern.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pattern: String,
}

impl Keys {
    pub(crate) fn new(format: TraceFormat, pattern: Option<&str>) -> Self {
        Keys {
            pattern: pattern
                .or(format.default_pattern())
                .unwrap_or("trace")
                .to_string(),
        }
    }

    pub(crate) fn key(&self, id: &str) -> String {
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
            format!("{}:{id}", self.pattern)
        } else if id.contains(':') {
            id.to_string()
        } else {
            self.numeric(xxhash_rust::xxh3::xxh3_64(id.as_bytes()))
        }
    }

    pub(crate) fn numeric(&self, id: u64) -> String {
        format!("{}:{id}", self.pattern)
    }
}

/// Parses one line of a text format (Twitter, ARC, and `default` CSV columns for CloudPhysics); `Ok(None)` for a
/// blank line. Numeric ids get the format's default key pattern (`arc:1024`).
///
/// # Errors
/// A description of what is wrong with the line; for `oracleGeneral`, which has no lines, always.
pub fn parse_line(format: TraceFormat, line: &str) -> Result<Option<TraceRequest>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let keys = Keys::new(format, None);
    parse_text_line(format, line, &CsvSpec::default(), &keys).map(Some)
}

/// Parses one non-blank line of a text format.
pub(crate) fn parse_text_line(
    format: TraceFormat,
    line: &str,
    spec: &CsvSpec,
    keys: &Keys,
) -> Result<TraceRequest, String> {
    match format {
        TraceFormat::Twitter => parse_twitter(line),
        TraceFormat::Arc => parse_arc(line, keys),
        TraceFormat::CloudPhysics => parse_csv(line, &CsvSpec::default(), keys),
        TraceFormat::Csv => parse_csv(line, spec, keys),
        TraceFormat::OracleGeneral => Err("oracleGeneral is a binary format, not lines".into()),
    }
}

fn parse_twitter(line: &str) -> Result<TraceRequest, String> {
    // Split into a fixed array: no allocation per line.
    let mut cols = [""; 7];
    let mut n = 0;
    for col in line.split(',') {
        if n < 7 {
            cols[n] = col;
        }
        n += 1;
    }
    if n != 7 {
        return Err(format!("expected 7 comma-separated columns, found {n}"));
    }
    let timestamp = parse_timestamp(cols[0])?;
    let key = cols[1];
    if key.is_empty() {
        return Err("empty key".into());
    }
    let value_size: usize = cols[3]
        .parse()
        .map_err(|_| format!("value_size {:?} is not a number", cols[3]))?;
    let value_size = checked_size(Some(value_size), "value_size")?;
    let op = Op::from_word(cols[5]).ok_or_else(|| format!("unknown operation {:?}", cols[5]))?;
    Ok(TraceRequest {
        timestamp: Some(timestamp),
        key: key.to_string(),
        op,
        value_size,
    })
}

/// `s` as given: callers trim where their format allows spaces (a CSV column), not per Twitter line.
fn parse_timestamp(s: &str) -> Result<f64, String> {
    let t: f64 = s
        .parse()
        .map_err(|_| format!("timestamp {s:?} is not a number"))?;
    if t.is_finite() && t >= 0.0 {
        Ok(t)
    } else {
        Err(format!("timestamp {s:?} is not a non-negative number"))
    }
}

fn parse_arc(line: &str, keys: &Keys) -> Result<TraceRequest, String> {
    let mut it = line.split_ascii_whitespace();
    let (Some(start), Some(blocks), Some(_), Some(_), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Err("expected 4 numbers: START_BLOCK N_BLOCKS IGNORED REQUEST_NUMBER".into());
    };
    let start: u64 = start
        .parse()
        .map_err(|_| format!("start block {start:?} is not a number"))?;
    let blocks: usize = blocks
        .parse()
        .map_err(|_| format!("block count {blocks:?} is not a number"))?;
    Ok(TraceRequest {
        timestamp: None,
        key: keys.numeric(start),
        op: Op::Get,
        value_size: checked_size(blocks.checked_mul(512), "512 × N_BLOCKS")?,
    })
}

fn parse_csv(line: &str, spec: &CsvSpec, keys: &Keys) -> Result<TraceRequest, String> {
    let col = |n: usize, what: &str| -> Result<&str, String> {
        line.split(spec.delimiter)
            .nth(n - 1)
            .map(str::trim)
            .ok_or_else(|| format!("no column {n} ({what}) in {:?}", truncate(line)))
    };
    let id = col(spec.obj_id_col, "object id")?;
    if id.is_empty() {
        return Err("empty object id".into());
    }
    let timestamp = spec
        .time_col
        .map(|c| col(c, "time").and_then(parse_timestamp))
        .transpose()?;
    let value_size = match spec.obj_size_col {
        Some(c) => {
            let s = col(c, "size")?;
            checked_size(
                Some(
                    s.parse()
                        .map_err(|_| format!("size {s:?} is not a number"))?,
                ),
                "size",
            )?
        }
        None => DEFAULT_CSV_VALUE_BYTES,
    };
    let op = match spec.op_col {
        Some(c) => {
            let w = col(c, "op")?;
            Op::from_word(w).ok_or_else(|| format!("unknown operation {w:?}"))?
        }
        None => Op::Get,
    };
    Ok(TraceRequest {
        timestamp,
        key: keys.key(id),
        op,
        value_size,
    })
}

/// Decodes one `oracleGeneral` record.
pub(crate) fn parse_oracle(
    record: &[u8; ORACLE_RECORD_BYTES],
    keys: &Keys,
) -> Result<TraceRequest, String> {
    let u32_at =
        |i: usize| u32::from_le_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&record[4..12]);
    let size = u32_at(12) as usize;
    Ok(TraceRequest {
        timestamp: Some(f64::from(u32_at(0))),
        key: keys.numeric(u64::from_le_bytes(id)),
        op: Op::Get,
        value_size: checked_size(Some(size), "object size")?,
    })
}

/// At most 80 characters of a line, for a message.
pub(crate) fn truncate(line: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    match line.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twitter_lines_parse() {
        let r = parse_line(TraceFormat::Twitter, "0,oltp:page:17,12,512,1,get,0\n")
            .expect("valid")
            .expect("not blank");
        assert_eq!(
            r,
            TraceRequest {
                timestamp: Some(0.0),
                key: "oltp:page:17".into(),
                op: Op::Get,
                value_size: 512
            }
        );
        let r = parse_line(TraceFormat::Twitter, "3,vm:lbn:9,8,4096,3,delete,0")
            .expect("valid")
            .expect("line");
        assert_eq!(r.op, Op::Delete);
        assert_eq!(parse_line(TraceFormat::Twitter, "  \n"), Ok(None));
    }

    #[test]
    fn malformed_twitter_lines_say_why() {
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,2,3,get")
            .expect_err("6 cols")
            .contains("7"));
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,x,3,get,0")
            .expect_err("size")
            .contains("value_size"));
        assert!(parse_line(TraceFormat::Twitter, "0,k,1,2,3,frob,0")
            .expect_err("op")
            .contains("frob"));
    }

    #[test]
    fn arc_lines_parse_with_the_format_pattern() {
        let r = parse_line(TraceFormat::Arc, "1024 8 0 1")
            .expect("valid")
            .expect("line");
        assert_eq!(
            r,
            TraceRequest {
                timestamp: None,
                key: "arc:1024".into(),
                op: Op::Get,
                value_size: 4096
            }
        );
        assert!(parse_line(TraceFormat::Arc, "x 8 0 1").is_err());
        assert!(parse_line(TraceFormat::Arc, "1 2 3").is_err());
        assert!(parse_line(TraceFormat::Arc, "1 18446744073709551615 0 1")
            .expect_err("overflow")
            .contains("exceeds"));
        assert!(
            parse_line(TraceFormat::Twitter, "0,k,1,99999999999,3,get,0")
                .expect_err("huge")
                .contains("exceeds")
        );
    }

    #[test]
    fn cloudphysics_and_csv_lines_parse() {
        let r = parse_line(TraceFormat::CloudPhysics, "1,5633898,2a,512,42932745")
            .expect("valid")
            .expect("line");
        assert_eq!(r.key, "cloudphysics:42932745");
        assert_eq!(r.op, Op::Delete);
        assert_eq!(r.timestamp, Some(5_633_898.0));
        assert_eq!(r.value_size, 512);
        let spec: CsvSpec = "obj-id-col=1, delimiter=tab".parse().expect("spec");
        let keys = Keys::new(TraceFormat::Csv, Some("disk"));
        let r = parse_text_line(TraceFormat::Csv, "77\tx", &spec, &keys).expect("line");
        assert_eq!(
            (r.key.as_str(), r.op, r.value_size),
            ("disk:77", Op::Get, 1)
        );
        let r = parse_text_line(TraceFormat::Csv, "user:9\tx", &spec, &keys).expect("line");
        assert_eq!(r.key, "user:9");
        // Ids that are not numbers stay under the one pattern, distinct and stable.
        let a = parse_text_line(TraceFormat::Csv, "deadbeef\tx", &spec, &keys).expect("line");
        let b = parse_text_line(TraceFormat::Csv, "cafe\tx", &spec, &keys).expect("line");
        assert!(a.key.starts_with("disk:") && b.key.starts_with("disk:") && a.key != b.key);
        assert_eq!(
            a.key,
            parse_text_line(TraceFormat::Csv, "deadbeef\ty", &spec, &keys)
                .expect("line")
                .key
        );
        let spec: CsvSpec = "time-col=1,obj-id-col=2,delimiter=,,op-col=3"
            .parse()
            .expect("spec");
        assert_eq!(spec.delimiter, ',');
        assert!(parse_text_line(TraceFormat::Csv, "1,7,frob", &spec, &keys)
            .expect_err("op")
            .contains("frob"));
        assert!(parse_text_line(TraceFormat::Csv, "1", &spec, &keys)
            .expect_err("short")
            .contains("column 2"));
        assert!("obj-id-col=0".parse::<CsvSpec>().is_err());
        assert!("obj-id-col=1,colour=red".parse::<CsvSpec>().is_err());
    }

    #[test]
    fn oracle_records_decode() {
        let mut rec = [0u8; ORACLE_RECORD_BYTES];
        rec[0..4].copy_from_slice(&7u32.to_le_bytes());
        rec[4..12].copy_from_slice(&123_456_789_012u64.to_le_bytes());
        rec[12..16].copy_from_slice(&4096u32.to_le_bytes());
        rec[16..24].copy_from_slice(&(-1i64).to_le_bytes());
        let r = parse_oracle(&rec, &Keys::new(TraceFormat::OracleGeneral, None)).expect("valid");
        assert_eq!(r.key, "oracle:123456789012");
        assert_eq!(
            (r.timestamp, r.value_size, r.op),
            (Some(7.0), 4096, Op::Get)
        );
    }

    #[test]
    fn formats_are_recognised_from_content() {
        assert_eq!(
            TraceFormat::detect(b"0,oltp:page:1,11,512,1,get,0\n"),
            Some(TraceFormat::Twitter)
        );
        assert_eq!(
            TraceFormat::detect(b"230027 8 0 0\n"),
            Some(TraceFormat::Arc)
        );
        assert_eq!(
            TraceFormat::detect(b"version,time,op,size,lbn\n1,2,28,512,9\n"),
            Some(TraceFormat::CloudPhysics)
        );
        assert_eq!(
            TraceFormat::detect(&[7, 0, 0, 0, 1, 2, 3, 4]),
            Some(TraceFormat::OracleGeneral)
        );
        assert_eq!(TraceFormat::detect(b"hello world\n"), None);
        // A BOM, and a character cut at the end of what was peeked, are still text.
        assert_eq!(
            TraceFormat::detect("\u{FEFF}version,time,op,size,lbn\n".as_bytes()),
            Some(TraceFormat::CloudPhysics)
        );
        assert_eq!(TraceFormat::detect(&"0,caf\u{e9}".as_bytes()[..6]), None);
        assert_eq!(TraceFormat::detect(b""), None);
        assert_eq!(
            "oracleGeneral".parse::<TraceFormat>().ok(),
            Some(TraceFormat::OracleGeneral)
        );
        assert!("xml".parse::<TraceFormat>().is_err());
    }
}
