//! Reads a `pg_dump -Fc -Z0` archive as it streams past and counts the rows of every
//! TABLE DATA entry: exact counts of exactly what the dump holds, with no second scan
//! of the database. The header also names the pg_dump that wrote it, so its version
//! needs no `pg_dump --version` (a second process start before the dump could begin).
//!
//! It is an inspector of the backup pipeline: it is shown the dump in whatever pieces the
//! pipeline reads, so it parses incrementally. The header and table of contents are
//! gathered until they parse (at most [`MAX_TOC`] bytes); the data blocks after them go
//! through a small state machine that never holds more than one archive integer.
//!
//! Format (pg_backup_archiver.c / pg_backup_custom.c): header `PGDMP` + version + int
//! and offset sizes, then the table of contents, then data blocks `0x01 <dumpId>` made
//! of length-prefixed chunks ending with a zero length. COPY text ends each row with a
//! newline (embedded ones are escaped) and the data with a `\.` line.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use crate::pipeline::Inspect;

const BLOCK_DATA: u8 = 1;
const BLOCK_BLOBS: u8 = 3;

/// Largest header and table of contents this reader gathers; a larger one (or a hostile
/// length in it) gives up counting, and the backup counts rows with `count(*)` instead.
pub const MAX_TOC: usize = 64 << 20;

/// Rows per (schema, table), from the archive's TABLE DATA blocks.
pub type RowCounts = BTreeMap<(String, String), i64>;

/// What the archive says of itself.
#[derive(Debug)]
pub struct ArchiveSummary {
    /// As `pg_dump --version` prints it: `pg_dump (PostgreSQL) 15.20 (Debian …)`.
    pub pg_dump_version: String,
    pub rows: RowCounts,
}

/// Counts the rows of an archive shown to it piece by piece (see the module documentation).
pub struct ArchiveCounter {
    phase: Phase,
}

enum Phase {
    /// Gathering the header and table of contents; a parse is tried once the buffer has
    /// grown to `next_try` bytes (doubling, so the gathering stays linear).
    Header {
        buffer: Vec<u8>,
        next_try: usize,
    },
    Data(DataBlocks),
    Failed(String),
}

impl Default for ArchiveCounter {
    fn default() -> Self {
        ArchiveCounter {
            phase: Phase::Header {
                buffer: Vec::new(),
                next_try: 4096,
            },
        }
    }
}

impl Inspect for ArchiveCounter {
    fn inspect(&mut self, raw: &[u8]) {
        match &mut self.phase {
            Phase::Header { buffer, next_try } => {
                buffer.extend_from_slice(raw);
                if buffer.len() < *next_try {
                    return;
                }
                let mut input = buffer.as_slice();
                match read_toc(&mut input) {
                    Ok(toc) => {
                        let rest = input.to_vec();
                        let mut blocks = DataBlocks::new(toc);
                        blocks.feed(&rest);
                        self.phase = Phase::Data(blocks);
                    }
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                        if buffer.len() > MAX_TOC {
                            self.phase = Phase::Failed(format!(
                                "the table of contents is larger than {MAX_TOC} bytes"
                            ));
                        } else {
                            *next_try = buffer.len() * 2;
                        }
                    }
                    Err(err) => self.phase = Phase::Failed(err.to_string()),
                }
            }
            Phase::Data(blocks) => blocks.feed(raw),
            Phase::Failed(_) => {}
        }
    }
}

impl ArchiveCounter {
    /// Who wrote the archive and the rows of each table, once it has been shown whole.
    pub fn finish(mut self) -> Result<ArchiveSummary, String> {
        if let Phase::Header { buffer, .. } = &mut self.phase {
            let mut input = buffer.as_slice();
            match read_toc(&mut input) {
                Ok(toc) => {
                    let mut blocks = DataBlocks::new(toc);
                    blocks.feed(input);
                    self.phase = Phase::Data(blocks);
                }
                Err(err) => return Err(err.to_string()),
            }
        }
        match self.phase {
            Phase::Data(blocks) => blocks.finish(),
            Phase::Failed(reason) => Err(reason),
            Phase::Header { .. } => Err("the archive ended in its table of contents".into()),
        }
    }
}

/// What the header and table of contents say.
struct Toc {
    pg_dump_version: String,
    int_size: usize,
    /// Which dump id holds which table's data.
    tables: BTreeMap<i64, (String, String)>,
}

struct Archive<R> {
    input: R,
    version: (u8, u8, u8),
    int_size: usize,
    off_size: usize,
}

impl<R: BufRead> Archive<R> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.input.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn int(&mut self) -> io::Result<i64> {
        let negative = self.byte()? != 0;
        let mut bytes = [0u8; 8];
        for i in 0..self.int_size {
            let b = self.byte()?;
            if let Some(slot) = bytes.get_mut(i) {
                *slot = b;
            }
        }
        let value = little_endian(&bytes);
        Ok(if negative { -value } else { value })
    }

    fn string(&mut self) -> io::Result<Option<String>> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= MAX_TOC)
            .ok_or_else(|| invalid(format!("a string of {len} bytes in the table of contents")))?;
        let mut bytes = vec![0u8; len];
        self.input.read_exact(&mut bytes)?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn at_least(&self, minor: u8) -> bool {
        self.version >= (1, minor, 0)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads the header and the table of contents; `input` is left at the first data block.
fn read_toc<R: BufRead>(input: R) -> io::Result<Toc> {
    let mut magic = [0u8; 5];
    let mut input = input;
    input.read_exact(&mut magic)?;
    if &magic != b"PGDMP" {
        return Err(invalid("not a pg_dump custom-format archive".into()));
    }
    let mut archive = Archive {
        input,
        version: (0, 0, 0),
        int_size: 4,
        off_size: 8,
    };
    let major = archive.byte()?;
    let minor = archive.byte()?;
    let revision = if major > 1 || minor > 0 {
        archive.byte()?
    } else {
        0
    };
    archive.version = (major, minor, revision);
    if major != 1 || !(12..=16).contains(&minor) {
        return Err(invalid(format!(
            "archive version {major}.{minor} is not one this reader knows"
        )));
    }
    archive.int_size = archive.byte()? as usize;
    archive.off_size = archive.byte()? as usize;
    if !(1..=8).contains(&archive.int_size) || archive.off_size > 16 {
        return Err(invalid(format!(
            "integer sizes {} and {} are not pg_dump's",
            archive.int_size, archive.off_size
        )));
    }
    if archive.byte()? != 1 {
        return Err(invalid("not the custom format".into()));
    }
    if archive.at_least(15) {
        let algorithm = archive.byte()?;
        if algorithm != 0 {
            return Err(invalid("the archive is compressed (expected -Z0)".into()));
        }
    } else if archive.int()? != 0 {
        return Err(invalid("the archive is compressed (expected -Z0)".into()));
    }
    for _ in 0..7 {
        archive.int()?; // creation date
    }
    archive.string()?; // database name
    archive.string()?; // server version
    let pg_dump_version = archive
        .string()?
        .ok_or_else(|| invalid("the header names no pg_dump version".into()))?;

    let entries = archive.int()?;
    let mut tables: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for _ in 0..entries {
        let dump_id = archive.int()?;
        archive.int()?; // had dumper
        archive.string()?; // table oid
        archive.string()?; // oid
        let tag = archive.string()?.unwrap_or_default();
        let desc = archive.string()?.unwrap_or_default();
        archive.int()?; // section
        archive.string()?; // definition
        archive.string()?; // drop statement
        archive.string()?; // copy statement
        let namespace = archive.string()?.unwrap_or_default();
        archive.string()?; // tablespace
        if archive.at_least(14) {
            archive.string()?; // table access method
        }
        if archive.at_least(16) {
            archive.int()?; // relkind
        }
        archive.string()?; // owner
        archive.string()?; // "with oids", always false now
        while archive.string()?.is_some() {} // dependencies
        archive.byte()?; // data offset flag
        for _ in 0..archive.off_size {
            archive.byte()?;
        }
        if desc == "TABLE DATA" {
            tables.insert(dump_id, (namespace, tag));
        }
    }
    Ok(Toc {
        pg_dump_version: format!("pg_dump (PostgreSQL) {pg_dump_version}"),
        int_size: archive.int_size,
        tables,
    })
}

/// The data blocks after the table of contents, as a state machine over the stream.
struct DataBlocks {
    toc: Toc,
    counts: RowCounts,
    state: State,
    /// The archive integer being gathered: its bytes so far.
    int: [u8; 9],
    int_have: usize,
    /// The TABLE DATA block being read: its table (if the TOC names it) and its rows.
    table: Option<(String, String)>,
    rows: RowCounter,
    /// Inside a large-object block (its chunks are not rows).
    blobs: bool,
    failed: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    BlockKind,
    BlockId,
    BlobOid,
    ChunkLength,
    ChunkData { left: u64 },
}

impl DataBlocks {
    fn new(toc: Toc) -> Self {
        DataBlocks {
            toc,
            counts: RowCounts::new(),
            state: State::BlockKind,
            int: [0; 9],
            int_have: 0,
            table: None,
            rows: RowCounter::default(),
            blobs: false,
            failed: None,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.failed.is_none() {
            match self.state {
                State::BlockKind => {
                    self.blobs = match data[0] {
                        BLOCK_DATA => false,
                        BLOCK_BLOBS => true,
                        other => {
                            self.failed = Some(format!("unknown data block type {other}"));
                            return;
                        }
                    };
                    data = &data[1..];
                    self.state = State::BlockId;
                }
                State::BlockId => {
                    let Some(dump_id) = self.take_int(&mut data) else {
                        continue;
                    };
                    if self.blobs {
                        self.state = State::BlobOid;
                    } else {
                        self.table = self.toc.tables.get(&dump_id).cloned();
                        self.rows = RowCounter::default();
                        self.state = State::ChunkLength;
                    }
                }
                State::BlobOid => {
                    let Some(oid) = self.take_int(&mut data) else {
                        continue;
                    };
                    self.state = if oid == 0 {
                        State::BlockKind
                    } else {
                        State::ChunkLength
                    };
                }
                State::ChunkLength => {
                    // pg_dump writes each COPY row as a chunk of its own: when a length and
                    // its whole chunk are at hand, the chunk is counted where it lies.
                    if self.int_have == 0
                        && let Some((len, chunk)) = self.whole_chunk(data)
                        && len > 0
                    {
                        if !self.blobs {
                            self.rows.feed(chunk);
                        }
                        data = &data[1 + self.toc.int_size + chunk.len()..];
                        continue;
                    }
                    let Some(len) = self.take_int(&mut data) else {
                        continue;
                    };
                    self.state = match len {
                        0 => self.end_of_chunks(),
                        len if len < 0 => {
                            self.failed = Some(format!("negative chunk length {len}"));
                            return;
                        }
                        len => State::ChunkData { left: len as u64 },
                    };
                }
                State::ChunkData { left } => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if !self.blobs {
                        self.rows.feed(&data[..n]);
                    }
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkLength
                    } else {
                        State::ChunkData { left }
                    };
                }
            }
        }
    }

    /// A zero length ends a table's data, or one large object's.
    fn end_of_chunks(&mut self) -> State {
        if self.blobs {
            return State::BlobOid;
        }
        if let Some(table) = self.table.take() {
            self.counts
                .insert(table, std::mem::take(&mut self.rows).rows);
        }
        State::BlockKind
    }

    /// A chunk length at the start of `data` followed by the whole chunk, if both are there.
    fn whole_chunk<'a>(&self, data: &'a [u8]) -> Option<(i64, &'a [u8])> {
        let header = 1 + self.toc.int_size;
        let len = buffered_int(data, self.toc.int_size)?;
        let chunk = data.get(header..header + usize::try_from(len).ok()?)?;
        Some((len, chunk))
    }

    /// Gathers the archive integer being read from the front of `data`; returns it once all
    /// its bytes are there.
    fn take_int(&mut self, data: &mut &[u8]) -> Option<i64> {
        let size = 1 + self.toc.int_size;
        let n = data.len().min(size - self.int_have);
        self.int[self.int_have..self.int_have + n].copy_from_slice(&data[..n]);
        self.int_have += n;
        *data = &data[n..];
        if self.int_have < size {
            return None;
        }
        self.int_have = 0;
        let value = little_endian(&self.int[1..size]);
        Some(if self.int[0] != 0 { -value } else { value })
    }

    fn finish(self) -> Result<ArchiveSummary, String> {
        if let Some(reason) = self.failed {
            return Err(reason);
        }
        if self.state != State::BlockKind {
            return Err("the archive ended inside a data block".into());
        }
        Ok(ArchiveSummary {
            pg_dump_version: self.toc.pg_dump_version,
            rows: self.counts,
        })
    }
}

/// The archive integer at the start of `buffered` (a sign byte, then `int_size` bytes,
/// least significant first), if it is all there and not negative.
fn buffered_int(buffered: &[u8], int_size: usize) -> Option<i64> {
    let (&sign, bytes) = buffered.split_first()?;
    let bytes = bytes.get(..int_size)?;
    if sign != 0 {
        return None;
    }
    Some(little_endian(bytes))
}

/// The magnitude of an archive integer: up to eight bytes, least significant first.
fn little_endian(bytes: &[u8]) -> i64 {
    bytes
        .iter()
        .rev()
        .fold(0i64, |value, &b| (value << 8) | i64::from(b))
}

/// Counts COPY text rows: newline-terminated lines before the `\.` end line.
#[derive(Default)]
struct RowCounter {
    rows: i64,
    /// The first bytes of a line that continues into the next chunk (enough to tell `\.`).
    head: [u8; 2],
    /// Length of that unfinished line so far.
    line_len: usize,
    ended: bool,
}

impl RowCounter {
    /// Newlines are found with SIMD (`memchr`); only lines of two bytes are looked at.
    fn feed(&mut self, data: &[u8]) {
        if self.ended {
            return;
        }
        // The common case: one whole row, as pg_dump writes them.
        if let Some((b'\n', line)) = data.split_last()
            && self.line_len == 0
            && memchr::memchr(b'\n', line).is_none()
        {
            self.ended = line == b"\\.";
            self.rows += i64::from(!self.ended);
            return;
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            let part = &data[start..end];
            if self.line_len + part.len() == 2 && self.line_head(part) == *b"\\." {
                self.ended = true;
                return;
            }
            self.rows += 1;
            self.line_len = 0;
            start = end + 1;
        }
        let rest = &data[start..];
        for (i, &byte) in rest
            .iter()
            .enumerate()
            .take(2usize.saturating_sub(self.line_len))
        {
            self.head[self.line_len + i] = byte;
        }
        self.line_len += rest.len();
    }

    /// The first two bytes of the line that `part` finishes.
    fn line_head(&self, part: &[u8]) -> [u8; 2] {
        let mut head = [0u8; 2];
        for (i, slot) in head.iter_mut().enumerate() {
            *slot = if i < self.line_len {
                self.head[i]
            } else {
                part[i - self.line_len]
            };
        }
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_lines_before_the_end_marker() {
        let cases: [(&[&[u8]], i64); 8] = [
            (&[b"1\tx\n2\tline\\nbreak\n3\t\\N\n\\.\n\n\n"], 3),
            (&[b"a\n\\", b".", b"\n", b"ignored\n"], 1),
            (&[b"\\", b".x\n", b"\\.\n"], 1),
            (&[b"", b"x", b"", b"\n"], 1),
            (&[b"\\.\n\n\n"], 0),
            (&[b"1\ta", b"bc\n2\t", b"\\.x\n\\", b".\n\n"], 2),
            (&[b"\\.x\n\\.\n"], 1),
            (&[b"a\n", b"b\n"], 2),
        ];
        for (chunks, expected) in cases {
            let mut counter = RowCounter::default();
            for chunk in chunks {
                counter.feed(chunk);
            }
            assert_eq!(counter.rows, expected, "{chunks:?}");
        }
    }

    /// Rows as the COPY text defines them: newline-terminated lines before the line `\.`.
    fn rows_by_definition(data: &[u8]) -> i64 {
        let mut rows = 0;
        for line in data.split_inclusive(|&b| b == b'\n') {
            if line == b"\\.\n" || line == b"\\." || !line.ends_with(b"\n") {
                break;
            }
            rows += 1;
        }
        rows
    }

    #[test]
    fn any_split_of_any_text_counts_as_the_definition_does() {
        // A small LCG: the same cases every run, no dependency.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |bound: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % bound
        };
        let alphabet = b"ab\\.\n\n\t";
        for case in 0..3000 {
            // Some texts long enough for the counter's 255-step blocks.
            let len = if case % 10 == 0 { 20_000 } else { next(80) };
            let mut text: Vec<u8> = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            if case % 3 == 0 {
                let at = next(text.len() + 1);
                text.splice(at..at, b"\n\\.\n".iter().copied());
            }
            let expected = rows_by_definition(&text);
            let mut counter = RowCounter::default();
            let mut rest = &text[..];
            while !rest.is_empty() {
                let n = 1 + next(rest.len().min(if case % 2 == 0 { 7 } else { 5000 }));
                counter.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(
                counter.rows,
                expected,
                "case {case}: {:?}",
                String::from_utf8_lossy(&text)
            );
        }
    }

    fn counted(
        archive: &[u8],
        mut pieces: impl FnMut(usize) -> usize,
    ) -> Result<ArchiveSummary, String> {
        let mut counter = ArchiveCounter::default();
        let mut rest = archive;
        let mut i = 0;
        while !rest.is_empty() {
            let n = pieces(i).clamp(1, rest.len());
            counter.inspect(&rest[..n]);
            rest = &rest[n..];
            i += 1;
        }
        counter.finish()
    }

    #[test]
    fn foreign_data_is_refused() {
        assert!(counted(b"PK\x03\x04 not a dump", |_| 3).is_err());
        assert!(counted(b"PGDMP\x01\x05\x00", |_| 100).is_err());
    }

    /// A small archive as pg_dump 15 writes one: two tables with data, one large object.
    fn archive() -> Vec<u8> {
        let int = |out: &mut Vec<u8>, value: i64| {
            out.push(u8::from(value < 0));
            out.extend_from_slice(&(value.unsigned_abs() as u32).to_le_bytes());
        };
        let string = |out: &mut Vec<u8>, text: Option<&str>| match text {
            Some(text) => {
                int(out, text.len() as i64);
                out.extend_from_slice(text.as_bytes());
            }
            None => int(out, -1),
        };
        let mut out = b"PGDMP".to_vec();
        out.extend_from_slice(&[1, 15, 0, 4, 8, 1, 0]);
        for _ in 0..7 {
            int(&mut out, 1);
        }
        string(&mut out, Some("crm"));
        string(&mut out, Some("15.19"));
        string(&mut out, Some("15.19 (Debian 15.19-0+deb12u1)"));
        let entries = [
            (1, "accounts", "TABLE DATA"),
            (2, "notes", "TABLE DATA"),
            (3, "x", "SEQUENCE"),
        ];
        int(&mut out, entries.len() as i64);
        for (id, tag, desc) in entries {
            int(&mut out, id);
            int(&mut out, 1);
            string(&mut out, Some("0"));
            string(&mut out, Some("16384"));
            string(&mut out, Some(tag));
            string(&mut out, Some(desc));
            int(&mut out, 2);
            string(&mut out, Some(""));
            string(&mut out, Some(""));
            string(&mut out, None);
            string(&mut out, Some("public"));
            string(&mut out, Some(""));
            string(&mut out, Some("heap"));
            string(&mut out, Some("postgres"));
            string(&mut out, Some("false"));
            string(&mut out, None);
            out.push(2);
            out.extend_from_slice(&[0; 8]);
        }
        let block = |out: &mut Vec<u8>, id: i64, rows: &[&str]| {
            out.push(BLOCK_DATA);
            int(out, id);
            for row in rows {
                int(out, row.len() as i64);
                out.extend_from_slice(row.as_bytes());
            }
            int(out, 3);
            out.extend_from_slice(b"\\.\n");
            int(out, 0);
        };
        block(&mut out, 1, &["1\talice\n", "2\tbob\n", "3\tcarol\n"]);
        out.push(BLOCK_BLOBS);
        int(&mut out, 9);
        int(&mut out, 16400);
        int(&mut out, 5);
        out.extend_from_slice(b"a\nb\nc");
        int(&mut out, 0);
        int(&mut out, 0);
        // A row split over two chunks, as pg_dump does with long rows.
        block(&mut out, 2, &["1\tlong ", "note\n"]);
        out
    }

    #[test]
    fn an_archive_shown_in_any_pieces_counts_the_same() {
        let archive = archive();
        for size in [1usize, 2, 3, 7, 64, 4096, archive.len()] {
            let summary = counted(&archive, |_| size).unwrap();
            assert_eq!(
                summary.pg_dump_version,
                "pg_dump (PostgreSQL) 15.19 (Debian 15.19-0+deb12u1)"
            );
            let rows: Vec<_> = summary.rows.into_iter().collect();
            assert_eq!(
                rows,
                [
                    (("public".to_string(), "accounts".to_string()), 3),
                    (("public".to_string(), "notes".to_string()), 1),
                ],
                "pieces of {size}"
            );
        }
        let mut state = 7usize;
        let random = counted(&archive, |_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (state >> 8) % 50
        });
        assert_eq!(random.unwrap().rows.len(), 2);
    }

    #[test]
    fn a_truncated_archive_or_a_hostile_length_is_an_error() {
        let archive = archive();
        for cut in [10, 100, archive.len() - 1] {
            assert!(counted(&archive[..cut], |_| 13).is_err(), "cut at {cut}");
        }
        // A string length of 2^31 in the header: refused, not allocated.
        let mut hostile = archive[..12 + 7 * 5].to_vec();
        hostile.extend_from_slice(&[0, 0, 0, 0, 0x80]);
        hostile.extend_from_slice(&[0; 64]);
        assert!(counted(&hostile, |_| 4096).is_err());
    }
}
