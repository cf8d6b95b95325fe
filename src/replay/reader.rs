//! Opening a trace: a file or any reader, plain or zstd, its format given or recognised from the content.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::format::{
    parse_oracle, parse_text_line, truncate, CsvSpec, Keys, TraceFormat, TraceRequest,
    CLOUDPHYSICS_HEADER, ORACLE_RECORD_BYTES,
};
use crate::error::{Error, Result};

/// Longest line a text trace may have, in bytes (64 KiB); a longer one is malformed and skipped to its end.
pub const MAX_TRACE_LINE_BYTES: usize = 64 << 10;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// How to read a trace.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReadOptions {
    /// The format; recognised from the content when `None` ([`TraceFormat::detect`]).
    pub format: Option<TraceFormat>,
    /// The columns of a generic CSV trace; given alone, it means [`TraceFormat::Csv`].
    pub csv: Option<CsvSpec>,
    /// The key pattern of numeric object ids (keys `<pattern>:<id>`); the format's
    /// [`default_pattern`](TraceFormat::default_pattern) when `None`.
    pub pattern: Option<String>,
}

impl ReadOptions {
    /// Sets the format.
    pub fn with_format(mut self, format: Option<TraceFormat>) -> Self {
        self.format = format;
        self
    }

    /// Sets the CSV columns.
    pub fn with_csv(mut self, csv: Option<CsvSpec>) -> Self {
        self.csv = csv;
        self
    }

    /// Sets the key pattern of numeric ids.
    pub fn with_pattern(mut self, pattern: Option<String>) -> Self {
        self.pattern = pattern;
        self
    }
}

/// What the next line (or record) of a trace held.
#[derive(Debug)]
pub enum Record {
    /// A request.
    Request(TraceRequest),
    /// A line that could not be read: an [`Error::Trace`] with its line (or record) number.
    Malformed(Error),
}

/// A trace being read, one request at a time.
pub struct TraceReader {
    input: Box<dyn BufRead + Send>,
    name: String,
    format: TraceFormat,
    spec: CsvSpec,
    keys: Keys,
    pattern: String,
    /// Lines (or records) read so far.
    position: u64,
    skip_header: bool,
    line: Vec<u8>,
    file_bytes_read: Arc<AtomicU64>,
    file_len: Option<u64>,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// Counts the bytes taken from the file (compressed, for a `.zst`), for a progress bar.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl TraceReader {
    /// Opens the trace at `path`: zstd-compressed or not (recognised by its magic number, whatever the name), its
    /// format as `opts` says or recognised from the first bytes of the content.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path when it cannot be read; [`Error::TraceFile`] when it is a directory, is empty,
    /// is named `.zst` but is not zstd, holds nothing after decompression, or is in no format this reads.
    pub fn open(path: &Path, opts: &ReadOptions) -> Result<Self> {
        let name = path.display().to_string();
        let io = |source| Error::Io {
            context: format!("opening trace {name}"),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            return Err(Error::trace_file(&name, "is a directory, not a trace file"));
        }
        // A pipe or a FIFO has no length: its content is checked below.
        if meta.is_file() && meta.len() == 0 {
            return Err(Error::trace_file(&name, "is empty"));
        }
        let count = Arc::new(AtomicU64::new(0));
        let file = File::open(path).map_err(io)?;
        let mut raw = BufReader::with_capacity(
            1 << 16,
            Counting {
                inner: file,
                count: count.clone(),
            },
        );
        let head = raw.fill_buf().map_err(io)?;
        let is_zstd = head.starts_with(&ZSTD_MAGIC);
        if !is_zstd && path.extension().is_some_and(|e| e == "zst") {
            let shown: String = String::from_utf8_lossy(&head[..head.len().min(16)])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            return Err(Error::trace_file(
                &name,
                format!("is named .zst but is not zstd-compressed (it starts with {shown:?})"),
            ));
        }
        let input: Box<dyn BufRead + Send> = if is_zstd {
            let dec = zstd::stream::read::Decoder::with_buffer(raw).map_err(io)?;
            Box::new(BufReader::with_capacity(1 << 16, dec))
        } else {
            Box::new(raw)
        };
        let mut reader = Self::with_name(input, opts, name)?;
        reader.file_bytes_read = count;
        reader.file_len = meta.is_file().then_some(meta.len());
        Ok(reader)
    }

    /// Reads a trace from any buffered reader (already decompressed).
    ///
    /// # Errors
    /// As [`open`](Self::open), for what follows the file itself: empty content, or no format recognised.
    pub fn new(input: impl BufRead + Send + 'static, opts: &ReadOptions) -> Result<Self> {
        Self::with_name(Box::new(input), opts, "the trace".into())
    }

    fn with_name(
        mut input: Box<dyn BufRead + Send>,
        opts: &ReadOptions,
        name: String,
    ) -> Result<Self> {
        let head = input.fill_buf().map_err(|source| Error::Io {
            context: format!("reading trace {name}"),
            source,
        })?;
        if head.is_empty() {
            return Err(Error::trace_file(
                &name,
                "holds no data after decompression",
            ));
        }
        let format = match (opts.format, &opts.csv) {
            (Some(f), _) => f,
            (None, Some(_)) => TraceFormat::Csv,
            (None, None) => TraceFormat::detect(head).ok_or_else(|| {
                let first = String::from_utf8_lossy(head);
                let first = first.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                Error::trace_file(
                    &name,
                    format!(
                        "cannot recognise the format from its first line {:?}: it is not twitter (7 comma-separated \
                         columns), arc (4 numbers), cloudphysics (header {CLOUDPHYSICS_HEADER}) or oracle-general \
                         (binary); pass --format, or --csv-spec for another CSV",
                        truncate(first)
                    ),
                )
            })?,
        };
        let spec = match (format, &opts.csv) {
            (TraceFormat::Csv, Some(spec)) => spec.clone(),
            (f, Some(spec)) => {
                return Err(Error::config(
                    "--csv-spec",
                    format!("{spec:?}"),
                    format!("names the columns of a generic CSV, not of the {f} format: drop it or --format"),
                ))
            }
            (TraceFormat::Csv, None) => {
                return Err(Error::config(
                    "--format",
                    "csv",
                    "a generic CSV needs its columns: pass --csv-spec (e.g. \"time-col=1,obj-id-col=2,obj-size-col=3\")",
                ))
            }
            _ => CsvSpec::default(),
        };
        if let Some(p) = &opts.pattern {
            if format == TraceFormat::Twitter {
                return Err(Error::config(
                    "--pattern",
                    p.as_str(),
                    "twitter traces carry their key patterns in their keys",
                ));
            }
        }
        let keys = Keys::new(format, opts.pattern.as_deref());
        let pattern = opts
            .pattern
            .clone()
            .or(format.default_pattern().map(String::from))
            .unwrap_or_default();
        let skip_header = match format {
            TraceFormat::Csv => spec.has_header,
            TraceFormat::CloudPhysics => true,
            _ => false,
        };
        Ok(TraceReader {
            input,
            name,
            format,
            spec,
            keys,
            pattern,
            position: 0,
            skip_header,
            line: Vec::new(),
            file_bytes_read: Arc::new(AtomicU64::new(0)),
            file_len: None,
        })
    }

    /// The format being read.
    pub fn format(&self) -> TraceFormat {
        self.format
    }

    /// Whether requests carry a timestamp (what `--ttl` needs): not for ARC, nor for a CSV without `time-col`.
    pub fn has_timestamps(&self) -> bool {
        match self.format {
            TraceFormat::Csv => self.spec.time_col.is_some(),
            f => f.has_timestamps(),
        }
    }

    /// The key pattern numeric ids get (empty for Twitter).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The path (or "the trace"), for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lines (or, for `oracleGeneral`, records) read so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes taken from the file so far (compressed bytes for a zstd file; 0 for [`new`](Self::new)).
    pub fn bytes_read(&self) -> u64 {
        self.file_bytes_read.load(Ordering::Relaxed)
    }

    /// The file's length in bytes (`None` for [`new`](Self::new)).
    pub fn total_bytes(&self) -> Option<u64> {
        self.file_len
    }

    /// The next request, or the next malformed line; `None` at the end. Blank lines and a header are passed over.
    ///
    /// # Errors
    /// [`Error::Io`] when reading or decompressing fails (a truncated or corrupt zstd stream included).
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.format == TraceFormat::OracleGeneral {
            return self.next_oracle();
        }
        loop {
            let Some(too_long) = self.read_line()? else {
                return Ok(None);
            };
            let n = self.position;
            let malformed =
                |reason: String| Ok(Some(Record::Malformed(Error::Trace { line: n, reason })));
            if too_long {
                return malformed(format!("longer than {MAX_TRACE_LINE_BYTES} bytes"));
            }
            let Ok(line) = std::str::from_utf8(&self.line) else {
                return malformed("not UTF-8 text".into());
            };
            let mut line = line.trim_end_matches(['\r', '\n']);
            if n == 1 {
                line = line.trim_start_matches('\u{FEFF}');
            }
            if line.trim().is_empty() {
                continue;
            }
            if std::mem::take(&mut self.skip_header)
                && (self.format != TraceFormat::CloudPhysics
                    || line.trim().eq_ignore_ascii_case(CLOUDPHYSICS_HEADER))
            {
                continue;
            }
            return match parse_text_line(self.format, line, &self.spec, &self.keys) {
                Ok(r) => Ok(Some(Record::Request(r))),
                Err(reason) => malformed(reason),
            };
        }
    }

    /// Reads one line into `self.line`, at most [`MAX_TRACE_LINE_BYTES`] of it; `Some(true)` when it was longer
    /// (the rest is passed over), `None` at the end.
    fn read_line(&mut self) -> Result<Option<bool>> {
        let io = |source, line| Error::Io {
            context: format!("reading trace {} at line {line}", self.name),
            source,
        };
        self.line.clear();
        let limit = MAX_TRACE_LINE_BYTES as u64 + 1;
        // `read_until` finds the newline with memchr; `take` bounds what one line may hold.
        let n = (&mut self.input)
            .take(limit)
            .read_until(b'\n', &mut self.line)
            .map_err(|e| io(e, self.position + 1))?;
        if n == 0 {
            return Ok(None);
        }
        self.position += 1;
        let too_long = n as u64 == limit && self.line.last() != Some(&b'\n');
        if too_long {
            self.input
                .skip_until(b'\n')
                .map_err(|e| io(e, self.position))?;
        }
        Ok(Some(too_long))
    }

    fn next_oracle(&mut self) -> Result<Option<Record>> {
        let mut rec = [0u8; ORACLE_RECORD_BYTES];
        let mut got = 0;
        while got < rec.len() {
            let n = self
                .input
                .read(&mut rec[got..])
                .map_err(|source| Error::Io {
                    context: format!(
                        "reading trace {} at record {}",
                        self.name,
                        self.position + 1
                    ),
                    source,
                })?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(None);
        }
        self.position += 1;
        if got < rec.len() {
            return Ok(Some(Record::Malformed(Error::Trace {
                line: self.position,
                reason: format!(
                    "truncated record: {got} of {ORACLE_RECORD_BYTES} bytes at the end of the file"
                ),
            })));
        }
        Ok(Some(match parse_oracle(&rec, &self.keys) {
            Ok(r) => Record::Request(r),
            Err(reason) => Record::Malformed(Error::Trace {
                line: self.position,
                reason,
            }),
        }))
    }
}

/// Property tests (proptest, 256 cases each, run by `cargo test`).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Bytes that look like each format some of the time, and like nothing the rest.
    fn trace_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            "([0-9]{1,4},[a-z:0-9]{0,12},[0-9]{1,3},[0-9x]{1,9},[0-9],(get|set|delete|frob),[0-9]\n){0,40}"
                .prop_map(String::into_bytes),
            "([0-9]{1,9} [0-9]{1,6} [0-9] [0-9]{1,5}\n){0,40}".prop_map(String::into_bytes),
            "version,time,op,size,lbn\n([0-9],[0-9]{1,8},(28|2a|ff),[0-9]{1,6},[0-9a-z]{0,9}\n){0,40}"
                .prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes, read as any format or recognised: each record is a request or a numbered malformed line,
        /// never a panic, and numbering only goes up.
        #[test]
        fn any_bytes_give_requests_or_numbered_errors(bytes in trace_bytes(), which in 0usize..6) {
            let format = TraceFormat::ALL.get(which).copied();
            let csv = (format == Some(TraceFormat::Csv))
                .then(|| "time-col=1,obj-id-col=2,obj-size-col=4,op-col=6".parse().expect("spec"));
            let opts = ReadOptions::default().with_format(format).with_csv(csv);
            let Ok(mut reader) = TraceReader::new(std::io::Cursor::new(bytes), &opts) else {
                return Ok(());
            };
            let mut last = 0;
            while let Some(record) = reader.next_record().expect("a Cursor does not fail") {
                prop_assert!(reader.position() > last);
                last = reader.position();
                if let Record::Malformed(e) = record {
                    let numbered = matches!(e, Error::Trace { line, .. } if line == last);
                    prop_assert!(numbered, "{}", e);
                }
            }
        }
    }
}
