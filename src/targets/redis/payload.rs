//! The RDB payload of a `SYNC` reply as a blocking [`Read`] that ends where the RDB ends:
//! after `$<len>` bytes, or before the 40-byte end mark of a diskless `$EOF:<mark>` payload.
//! A stream that stops short of either is an error, never a shorter RDB.

use std::io::{self, Read};

use super::replication::SyncPayload;

pub struct PayloadReader<R> {
    inner: R,
    /// Bytes left of a `$<len>` payload; `None` for a diskless one.
    remaining: Option<u64>,
    /// The end mark of a diskless payload.
    mark: Vec<u8>,
    /// Read from `inner` but not yet returned; of a diskless payload, the last
    /// `mark.len()` bytes seen are always here, since they may be the mark.
    pending: Vec<u8>,
    /// The end (length or mark) has been reached.
    done: bool,
}

/// Reads of less than this, when the caller's buffer is too small to take the held-back
/// bytes and new data, go through `pending`.
const SMALL_READ: usize = 4096;

impl<R: Read> PayloadReader<R> {
    pub fn new(payload: SyncPayload, inner: R) -> Self {
        let (remaining, mark) = match payload {
            SyncPayload::Length(len) => (Some(len), Vec::new()),
            SyncPayload::UntilMark(mark) => (None, mark),
        };
        PayloadReader {
            inner,
            remaining,
            mark,
            pending: Vec::new(),
            done: false,
        }
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = loop {
            match self.inner.read(buf) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the replication stream before the RDB ended",
            ));
        }
        Ok(n)
    }

    fn read_until_mark(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mark_len = self.mark.len();
        loop {
            // Pending bytes older than the last `mark_len` are RDB.
            let safe = if self.done {
                self.pending.len()
            } else {
                self.pending.len().saturating_sub(mark_len)
            };
            if safe > 0 || self.done {
                let n = safe.min(buf.len());
                buf[..n].copy_from_slice(&self.pending[..n]);
                self.pending.drain(..n);
                return Ok(n);
            }
            let held = self.pending.len();
            if buf.len() >= held + SMALL_READ {
                // Straight into the caller's buffer, behind the held-back bytes.
                buf[..held].copy_from_slice(&self.pending);
                let total = held + self.read_inner(&mut buf[held..])?;
                if buf[..total].ends_with(&self.mark) {
                    self.done = true;
                    self.pending.clear();
                    return Ok(total - mark_len);
                }
                let keep = mark_len.min(total);
                self.pending.clear();
                self.pending.extend_from_slice(&buf[total - keep..total]);
                if total > keep {
                    return Ok(total - keep);
                }
            } else {
                let mut small = [0u8; SMALL_READ];
                let n = self.read_inner(&mut small)?;
                self.pending.extend_from_slice(&small[..n]);
                if self.pending.ends_with(&self.mark) {
                    self.done = true;
                    self.pending.truncate(self.pending.len() - mark_len);
                }
            }
        }
    }
}

impl<R: Read> Read for PayloadReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.remaining {
            Some(0) => Ok(0),
            Some(remaining) => {
                let want = buf
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                let n = self.read_inner(&mut buf[..want])?;
                self.remaining = Some(remaining - n as u64);
                Ok(n)
            }
            None => self.read_until_mark(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its data in pieces of `piece` bytes, then ends.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        piece: usize,
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.piece).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn read_all(
        payload: SyncPayload,
        data: Vec<u8>,
        piece: usize,
        buf: usize,
    ) -> io::Result<Vec<u8>> {
        let mut reader = PayloadReader::new(payload, Pieces { data, at: 0, piece });
        let mut out = Vec::new();
        let mut chunk = vec![0u8; buf];
        loop {
            match reader.read(&mut chunk)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn rdb(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_diskless_payload_ends_before_its_mark_whatever_the_read_sizes() {
        let mark = vec![b'm'; 40];
        for len in [0, 1, 39, 40, 41, 5000, 70_000] {
            let mut stream = rdb(len);
            stream.extend_from_slice(&mark);
            for piece in [1, 7, 40, 41, 4096, 100_000] {
                for buf in [1, 3, 40, 100, 4200, 65_536] {
                    let got = read_all(
                        SyncPayload::UntilMark(mark.clone()),
                        stream.clone(),
                        piece,
                        buf,
                    )
                    .unwrap();
                    assert!(got == rdb(len), "len {len}, piece {piece}, buf {buf}");
                }
            }
        }
    }

    #[test]
    fn a_stream_that_stops_before_the_mark_is_an_error() {
        let mark = vec![b'm'; 40];
        let mut stream = rdb(10_000);
        stream.extend_from_slice(&mark[..39]);
        for buf in [3, 65_536] {
            let err = read_all(
                SyncPayload::UntilMark(mark.clone()),
                stream.clone(),
                4096,
                buf,
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn a_sized_payload_ends_at_its_length_and_not_before() {
        let mut stream = rdb(10_000);
        stream.extend_from_slice(b"+more replication traffic");
        for buf in [1, 999, 65_536] {
            let got = read_all(SyncPayload::Length(10_000), stream.clone(), 3000, buf).unwrap();
            assert!(got == rdb(10_000), "buf {buf}");
        }
        let err = read_all(SyncPayload::Length(20_000), rdb(10_000), 3000, 65_536).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            read_all(SyncPayload::Length(0), rdb(5), 3000, 100)
                .unwrap()
                .is_empty()
        );
    }
}
