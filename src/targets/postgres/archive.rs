//! Reads a `pg_dump -Fc -Z0` archive as it streams past and counts the rows of every
//! TABLE DATA entry: exact counts of exactly what the dump holds, with no second scan
//! of the database. The header also names the pg_dump that wrote it, so its version
//! needs no `pg_dump --version` (a second process start, through Debian's Perl wrapper
//! ~70 ms before the dump could begin). Blocking code; fed from the dump's stream
//! through a channel.
//!
//! Format (pg_backup_archiver.c / pg_backup_custom.c): header `PGDMP` + version + int
//! and offset sizes, then the table of contents, then data blocks `0x01 <dumpId>` made
//! of length-prefixed chunks ending with a zero length. COPY text ends each row with a
//! newline (embedded ones are escaped) and the data with a `\.` line.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

const BLOCK_DATA: u8 = 1;
const BLOCK_BLOBS: u8 = 3;

/// Rows per (schema, table), from the archive's TABLE DATA blocks.
pub type RowCounts = BTreeMap<(String, String), i64>;

/// What the archive says of itself.
#[derive(Debug)]
pub struct ArchiveSummary {
    /// As `pg_dump --version` prints it: `pg_dump (PostgreSQL) 15.20 (Debian …)`.
    pub pg_dump_version: String,
    pub rows: RowCounts,
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
        let mut bytes = vec![0u8; len as usize];
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

/// Reads a custom-format archive from `input` to its end: who wrote it, and the rows of
/// each table. Table data is looked at where `input` buffers it, never copied.
pub fn read_archive<R: BufRead>(input: R) -> io::Result<ArchiveSummary> {
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

    // Table of contents: which dump id holds which table's data.
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

    // Data blocks, in order, until the end of the stream.
    let mut counts = RowCounts::new();
    loop {
        let kind = match archive.byte() {
            Ok(kind) => kind,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err),
        };
        let dump_id = archive.int()?;
        match kind {
            BLOCK_DATA => {
                let mut rows = RowCounter::default();
                each_chunk(&mut archive, |chunk| rows.feed(chunk))?;
                if let Some(table) = tables.get(&dump_id) {
                    counts.insert(table.clone(), rows.rows);
                }
            }
            BLOCK_BLOBS => loop {
                let oid = archive.int()?;
                if oid == 0 {
                    break;
                }
                each_chunk(&mut archive, |_| {})?;
            },
            other => return Err(invalid(format!("unknown data block type {other}"))),
        }
    }
    Ok(ArchiveSummary {
        pg_dump_version: format!("pg_dump (PostgreSQL) {pg_dump_version}"),
        rows: counts,
    })
}

/// Hands the length-prefixed chunks of one data block to `each`, in the pieces the input
/// has them buffered in. With `-Z0`, pg_dump writes every COPY row as a chunk of its own
/// (~100 bytes in pgbench): the common case, a length and its chunk both in the buffer,
/// is read straight from it, without a call per byte.
fn each_chunk<R: BufRead>(archive: &mut Archive<R>, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let header = 1 + archive.int_size;
    loop {
        let buffered = archive.input.fill_buf()?;
        if let Some(len) = buffered_int(buffered, archive.int_size) {
            if len == 0 {
                archive.input.consume(header);
                return Ok(());
            }
            if let Some(chunk) = usize::try_from(len)
                .ok()
                .and_then(|len| buffered.get(header..header + len))
            {
                each(chunk);
                let used = header + chunk.len();
                archive.input.consume(used);
                continue;
            }
        }
        let len = archive.int()?;
        if len == 0 {
            return Ok(());
        }
        if len < 0 {
            return Err(invalid(format!("negative chunk length {len}")));
        }
        let mut left = len as u64;
        while left > 0 {
            let buffered = archive.input.fill_buf()?;
            if buffered.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = buffered
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            each(&buffered[..n]);
            archive.input.consume(n);
            left -= n as u64;
        }
    }
}

/// The archive integer at the start of `buffered` (a sign byte, then `int_size` bytes,
/// least significant first), if it is all there and not negative; as [`Archive::int`].
fn buffered_int(buffered: &[u8], int_size: usize) -> Option<i64> {
    let (&sign, bytes) = buffered.split_first()?;
    let bytes = bytes.get(..int_size)?;
    if sign != 0 || int_size > 8 {
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

    #[test]
    fn foreign_data_is_refused() {
        assert!(read_archive(&b"PK\x03\x04 not a dump"[..]).is_err());
        assert!(read_archive(&b"PGDMP\x01\x05\x00"[..]).is_err());
    }
}
