//! Keys one by one: SCAN + DUMP + PTTL batches out of a database, the key stream read back
//! from an artifact, and RESTOREs onto a target with a policy for keys that exist.

use redis::aio::MultiplexedConnection;
use tokio::io::AsyncReadExt;

use super::format::{Decoded, KeyRecord, KeysDecoder};
use super::{Endpoint, KEYS_ARTIFACT, command_error, connect};
use crate::targets::TargetError;

/// Keys fetched or restored per round trip.
const BATCH: usize = 200;

/// Walks one database with SCAN; each call returns the next batch of records (DUMP + PTTL in
/// one pipelined round trip), so memory holds one batch at a time.
pub(super) struct Scanner {
    conn: MultiplexedConnection,
    db: u32,
    cursor: u64,
    keys: Vec<Vec<u8>>,
    done: bool,
}

impl Scanner {
    /// `conn` is connected to database `db`.
    pub(super) fn new(conn: MultiplexedConnection, db: u32) -> Self {
        Scanner {
            conn,
            db,
            cursor: 0,
            keys: Vec::new(),
            done: false,
        }
    }

    pub(super) async fn next_batch(&mut self) -> Result<Option<Vec<KeyRecord>>, TargetError> {
        while self.keys.is_empty() {
            if self.done {
                return Ok(None);
            }
            let (cursor, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(self.cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await
                .map_err(|err| command_error("SCAN", err))?;
            self.cursor = cursor;
            self.done = cursor == 0;
            self.keys = keys;
        }
        let take = self.keys.len().min(BATCH);
        let chunk: Vec<Vec<u8>> = self.keys.drain(..take).collect();
        let mut pipe = redis::pipe();
        for key in &chunk {
            pipe.cmd("DUMP").arg(key).cmd("PTTL").arg(key);
        }
        let replies: Vec<(Option<Vec<u8>>, i64)> = pipe
            .query_async(&mut self.conn)
            .await
            .map_err(|err| command_error("DUMP", err))?;
        let mut batch = Vec::with_capacity(chunk.len());
        for (key, (payload, pttl)) in chunk.into_iter().zip(replies) {
            // Deleted since SCAN, or expired between DUMP and PTTL.
            let Some(payload) = payload else { continue };
            if pttl == -2 {
                continue;
            }
            batch.push(KeyRecord {
                db: self.db,
                key,
                pttl: (pttl >= 0).then_some(pttl.max(1)),
                payload,
            });
        }
        Ok(Some(batch))
    }
}

/// The records of a keys-mode artifact, decoded as the artifact streams in.
pub(super) struct KeyStream<R> {
    reader: R,
    decoder: KeysDecoder,
    buf: Vec<u8>,
    declared: Option<u64>,
}

impl<R: tokio::io::AsyncRead + Unpin> KeyStream<R> {
    pub(super) fn new(reader: R) -> Self {
        KeyStream {
            reader,
            decoder: KeysDecoder::default(),
            buf: vec![0u8; 256 * 1024],
            declared: None,
        }
    }

    pub(super) async fn next(&mut self) -> Result<Option<KeyRecord>, TargetError> {
        loop {
            let unusable = |reason| TargetError::Unusable(format!("{KEYS_ARTIFACT}: {reason}"));
            while let Some(item) = self.decoder.next().map_err(unusable)? {
                match item {
                    Decoded::Record(record) => return Ok(Some(record)),
                    Decoded::End(count) => self.declared = Some(count),
                }
            }
            let n = self
                .reader
                .read(&mut self.buf)
                .await
                .map_err(|err| TargetError::Unusable(format!("{KEYS_ARTIFACT}: {err}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }

    /// After the last record: the key count the stream's end record declares.
    pub(super) fn declared(&self) -> Result<u64, TargetError> {
        self.declared
            .ok_or_else(|| TargetError::Unusable(format!("{KEYS_ARTIFACT} has no end record")))
    }

    /// Reads the stream to its end, counting records; the end record must say as many.
    pub(super) async fn count(mut self) -> Result<u64, TargetError> {
        let mut records = 0u64;
        while self.next().await?.is_some() {
            records += 1;
        }
        match self.declared()? {
            declared if declared == records => Ok(records),
            declared => Err(TargetError::Unusable(format!(
                "{KEYS_ARTIFACT}: {records} records, but the stream says {declared}"
            ))),
        }
    }
}

/// What an [`Applier`] did.
#[derive(Default)]
pub(super) struct Counts {
    pub restored: u64,
    pub skipped: u64,
}

/// RESTOREs records onto a target in pipelined batches, one connection per database.
pub(super) struct Applier<'a> {
    target: &'a Endpoint,
    replace: bool,
    current: Option<(u32, MultiplexedConnection)>,
    batch: Vec<KeyRecord>,
    counts: Counts,
}

impl<'a> Applier<'a> {
    pub(super) fn new(target: &'a Endpoint, replace: bool) -> Self {
        Applier {
            target,
            replace,
            current: None,
            batch: Vec::new(),
            counts: Counts::default(),
        }
    }

    pub(super) async fn push(&mut self, record: KeyRecord) -> Result<(), TargetError> {
        if self.batch.last().is_some_and(|last| last.db != record.db) {
            self.flush().await?;
        }
        self.batch.push(record);
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TargetError> {
        let Some(db) = self.batch.first().map(|r| r.db) else {
            return Ok(());
        };
        if self
            .current
            .as_ref()
            .is_none_or(|(current, _)| *current != db)
        {
            self.current = Some((db, connect(self.target, db).await?));
        }
        let Some((_, conn)) = self.current.as_mut() else {
            return Ok(());
        };
        let batch = std::mem::take(&mut self.batch);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for record in &batch {
            let command = pipe
                .cmd("RESTORE")
                .arg(&record.key)
                .arg(record.pttl.unwrap_or(0))
                .arg(&record.payload);
            if self.replace {
                command.arg("REPLACE");
            }
        }
        let replies: Vec<redis::RedisResult<redis::Value>> = pipe
            .query_async(conn)
            .await
            .map_err(|err| command_error("RESTORE", err))?;
        for (record, reply) in batch.iter().zip(replies) {
            match reply {
                Err(err) if err.code() == Some("BUSYKEY") => self.counts.skipped += 1,
                Err(err) => {
                    return Err(TargetError::Tool {
                        tool: "redis".into(),
                        message: format!(
                            "RESTORE of `{}` in db{}: {err}",
                            String::from_utf8_lossy(&record.key),
                            record.db
                        ),
                        retryable: false,
                    });
                }
                Ok(_) => self.counts.restored += 1,
            }
        }
        Ok(())
    }

    pub(super) async fn finish(mut self) -> Result<Counts, TargetError> {
        self.flush().await?;
        Ok(self.counts)
    }
}
