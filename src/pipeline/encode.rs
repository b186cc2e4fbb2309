//! Backup direction: a blocking source in, a stored artifact out.
//!
//! One thread reads the source in chunks and compresses (and encrypts) them into stored chunks,
//! which an upload task sends to storage; a second thread hashes the raw chunks and shows them
//! to the target's inspector (a row counter, a checksum, per-file digests: whatever the target
//! learns from its own bytes). No chunk passes through the target or the async runtime on its
//! way to storage.
//!
//! Nothing becomes visible in storage until the target commits the artifact, which it does
//! once it knows the source was whole (a child process that exited 0, say): a
//! [`PendingArtifact`] dropped uncommitted, or a stream whose future is dropped, aborts its
//! upload. A running stream stops when its source ends: a step is cancelled by closing the
//! source (killing the child, shutting the socket), which every target's source does when
//! it is dropped.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::chunk::{Chunk, ChunkPool};
use super::compress::Compressor;
use super::sha256::Sha256;
use super::{CHANNEL_DEPTH, Codec, POOLED_CHUNKS, PipelineError};
use crate::progress::Meter;
use crate::storage::manifest::{ArtifactRecord, Compression, Encryption};
use crate::storage::{Storage, Upload};

/// A read of less than this found the pipe or socket nearly empty: the reader pauses.
const SHORT_READ: usize = 64 * 1024;
/// How long the reader lets a pipe or socket fill after a short read. A blocking read is
/// woken by every write of the peer (`pg_dump` writes 4 KiB at a time); pausing lets data
/// gather, so a fast source is read in large pieces and a slow one at most every pause.
const REFILL_PAUSE: std::time::Duration = std::time::Duration::from_micros(500);

/// Sees every chunk of an artifact's raw bytes, in order, on the pipeline's hashing thread.
pub trait Inspect: Send + 'static {
    fn inspect(&mut self, raw: &[u8]);

    /// Hashes `raw` into the stream's digest and inspects it. An inspector that hashes some of
    /// the same bytes itself does both in one pass (see [`super::sha256::update_both`]).
    fn hash_and_inspect(&mut self, raw: &[u8], stream: &mut Sha256) {
        stream.update(raw);
        self.inspect(raw);
    }
}

/// No inspection.
impl Inspect for () {
    fn inspect(&mut self, _raw: &[u8]) {}
}

impl<F: FnMut(&[u8]) + Send + 'static> Inspect for F {
    fn inspect(&mut self, raw: &[u8]) {
        self(raw)
    }
}

/// What [`stream`] gives back once the source has ended: the source and the inspector (with
/// whatever they learned), and the artifact, uploaded but not yet committed.
pub struct Streamed<R, I> {
    pub source: R,
    pub inspector: I,
    pub artifact: PendingArtifact,
}

/// An artifact whose bytes are all uploaded; [`PendingArtifact::commit`] makes it visible,
/// dropping it aborts the upload.
pub struct PendingArtifact {
    record: ArtifactRecord,
    upload: UploadGuard,
}

impl PendingArtifact {
    pub fn record(&self) -> &ArtifactRecord {
        &self.record
    }

    /// Completes the upload; returns the artifact's record for the manifest.
    pub async fn commit(mut self) -> Result<ArtifactRecord, PipelineError> {
        self.upload.commit().await?;
        Ok(self.record)
    }
}

/// Uploads whose artifact was dropped before it was committed: they abort in the background,
/// and whoever owns the backup can wait for those aborts to complete.
#[derive(Clone, Default)]
pub struct PendingAborts(Arc<Mutex<Vec<UploadTask>>>);

type UploadTask = JoinHandle<Result<(), PipelineError>>;

impl PendingAborts {
    /// Waits until every dropped upload has been aborted.
    pub async fn wait(&self) {
        let tasks: Vec<_> = match self.0.lock() {
            Ok(mut tasks) => tasks.drain(..).collect(),
            Err(_) => return,
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    fn push(&self, task: UploadTask) {
        if let Ok(mut tasks) = self.0.lock() {
            tasks.push(task);
        }
    }
}

/// Where an artifact goes and what its record says of it.
pub struct ArtifactSpec {
    /// The object's key in storage.
    pub key: String,
    pub name: String,
    /// What the raw bytes are (`pg_dump-custom`, `rdb`, `tar`, …).
    pub format: String,
}

/// Streams `source` to its end into a new object: raw bytes hashed and shown to `inspector`,
/// compressed, encrypted when the codec says so, hashed again, uploaded.
pub async fn stream<R, I>(
    storage: &Storage,
    codec: &Codec,
    pending: &PendingAborts,
    spec: ArtifactSpec,
    source: R,
    inspector: I,
) -> Result<Streamed<R, I>, PipelineError>
where
    R: Read + Send + 'static,
    I: Inspect,
{
    let ArtifactSpec { key, name, format } = spec;
    let upload = storage.start_upload(&key).await?;
    let (stored_tx, stored_rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let (verdict_tx, verdict_rx) = oneshot::channel();
    let guard = UploadGuard {
        stop: Arc::new(AtomicBool::new(false)),
        verdict: Some(verdict_tx),
        task: Some(tokio::spawn(upload_task(upload, stored_rx, verdict_rx))),
        pending: pending.clone(),
    };
    let stop = guard.stop.clone();
    let encoder_codec = codec.clone();
    let meter = Meter::of_key(&key);
    let encoded = tokio::task::spawn_blocking(move || {
        encode(source, inspector, stored_tx, &encoder_codec, &stop, meter)
    })
    .await
    .unwrap_or_else(|err| Err(PipelineError::Internal(format!("pipeline thread: {err}"))));
    let encoded = match encoded {
        Ok(encoded) => encoded,
        Err(err) => return Err(guard.failure(err).await),
    };
    let record = ArtifactRecord {
        name,
        key,
        format,
        raw_sha256: encoded.raw.0,
        raw_size: encoded.raw.1,
        stored_sha256: encoded.stored.0,
        stored_size: encoded.stored.1,
        compression: Compression {
            algorithm: "zstd".into(),
            level: codec.zstd_level,
        },
        encryption: codec.encrypts().then(|| Encryption {
            algorithm: "age-x25519".into(),
            recipients: codec.recipient_fingerprints(),
        }),
    };
    Ok(Streamed {
        source: encoded.source,
        inspector: encoded.inspector,
        artifact: PendingArtifact {
            record,
            upload: guard,
        },
    })
}

/// The upload task of one artifact, seen from the caller: it completes the upload on
/// [`UploadGuard::commit`] and aborts it when dropped.
struct UploadGuard {
    /// Tells the pipeline thread to stop at its next chunk.
    stop: Arc<AtomicBool>,
    verdict: Option<oneshot::Sender<()>>,
    task: Option<UploadTask>,
    pending: PendingAborts,
}

impl UploadGuard {
    async fn commit(&mut self) -> Result<(), PipelineError> {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(());
        }
        self.join().await
    }

    /// The pipeline failed with `err`; when it failed because the upload stopped, the
    /// upload's own error says why.
    async fn failure(mut self, err: PipelineError) -> PipelineError {
        self.stop.store(true, Ordering::SeqCst);
        self.verdict = None;
        let uploaded = self.join().await;
        match (err, uploaded) {
            (PipelineError::UploadStopped, Err(upload_err)) => upload_err,
            (err, _) => err,
        }
    }

    async fn join(&mut self) -> Result<(), PipelineError> {
        match self.task.take() {
            Some(task) => task
                .await
                .unwrap_or_else(|err| Err(PipelineError::Internal(err.to_string()))),
            None => Err(PipelineError::Aborted),
        }
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.verdict = None; // the upload task reads this as "abort"
        if let Some(task) = self.task.take() {
            self.pending.push(task);
        }
    }
}

/// Moves stored chunks into the multipart upload, then completes it on the verdict, or
/// aborts it when the verdict's sender is dropped.
async fn upload_task(
    mut upload: Upload,
    mut rx: mpsc::Receiver<Bytes>,
    verdict: oneshot::Receiver<()>,
) -> Result<(), PipelineError> {
    while let Some(chunk) = rx.recv().await {
        if let Err(err) = upload.write(chunk).await {
            drop(rx); // the pipeline's next send fails and it stops
            upload.discard().await;
            return Err(err.into());
        }
    }
    if verdict.await.is_ok() {
        Ok(upload.finish().await?)
    } else {
        upload.discard().await;
        Err(PipelineError::Aborted)
    }
}

struct Encoded<R, I> {
    source: R,
    inspector: I,
    /// SHA-256 and size of the raw bytes, and of the stored ones.
    raw: (String, u64),
    stored: (String, u64),
}

/// The pipeline thread: read, compress, encrypt; hashing and inspection on a thread of their
/// own, from the same chunks (`Bytes` clones, not copies).
fn encode<R: Read, I: Inspect>(
    mut source: R,
    inspector: I,
    out: mpsc::Sender<Bytes>,
    codec: &Codec,
    stop: &AtomicBool,
    meter: Meter,
) -> Result<Encoded<R, I>, PipelineError> {
    let chunks = ChunkPool::new(codec.chunk_size, POOLED_CHUNKS);
    let mut compressor = Compressor::new(codec, out)?;
    std::thread::scope(|scope| {
        let raw = HashThread::spawn(scope, inspector);
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(PipelineError::Aborted);
            }
            let (chunk, ended) = fill(&mut source, chunks.take()).map_err(PipelineError::Source)?;
            if !chunk.is_empty() {
                let chunk = chunk.freeze();
                meter.add(chunk.len());
                raw.send(&chunk)?;
                compressor.write_all(&chunk)?;
            }
            if ended {
                break;
            }
        }
        let stored = compressor.finish()?;
        let (raw, inspector) = raw.finish()?;
        Ok(Encoded {
            source,
            inspector,
            raw,
            stored,
        })
    })
}

/// The hashing thread: the raw bytes' SHA-256 and size, and the inspector.
struct HashThread<'scope, I> {
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::ScopedJoinHandle<'scope, ((String, u64), I)>,
}

impl<'scope, I: Inspect> HashThread<'scope, I> {
    fn spawn<'env>(scope: &'scope std::thread::Scope<'scope, 'env>, mut inspector: I) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(CHANNEL_DEPTH);
        let thread = scope.spawn(move || {
            let mut stream = Sha256::new();
            let mut bytes = 0u64;
            for chunk in rx {
                inspector.hash_and_inspect(&chunk, &mut stream);
                bytes += chunk.len() as u64;
            }
            ((stream.finish_hex(), bytes), inspector)
        });
        HashThread { tx, thread }
    }

    fn send(&self, chunk: &Bytes) -> Result<(), PipelineError> {
        self.tx
            .send(chunk.clone())
            .map_err(|_| PipelineError::Internal("the hashing thread stopped".into()))
    }

    fn finish(self) -> Result<((String, u64), I), PipelineError> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| PipelineError::Internal("the hashing thread panicked".into()))
    }
}

/// Fills `chunk` from `source` until it is full or the source ends (then `true`).
fn fill(source: &mut impl Read, mut chunk: Chunk) -> io::Result<(Chunk, bool)> {
    while !chunk.is_full() {
        match source.read(chunk.spare()) {
            Ok(0) => return Ok((chunk, true)),
            Ok(n) => {
                chunk.advance(n);
                if n < SHORT_READ && !chunk.is_full() {
                    std::thread::sleep(REFILL_PAUSE);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok((chunk, false))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_pipe_written_in_small_pieces_fills_whole_chunks() {
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let expected = data.clone();
        let producer = std::thread::spawn(move || {
            for piece in data.chunks(4096) {
                writer.write_all(piece).unwrap();
            }
        });
        let pool = ChunkPool::new(64 * 1024, 2);
        let mut received = Vec::new();
        loop {
            let (chunk, ended) = fill(&mut reader, pool.take()).unwrap();
            if !ended {
                assert_eq!(chunk.len(), 64 * 1024);
            }
            received.extend_from_slice(chunk.as_ref());
            if ended {
                break;
            }
        }
        producer.join().unwrap();
        assert!(received == expected);
    }

    /// Fails after handing out `good` bytes.
    struct Failing {
        good: usize,
    }

    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.good == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(7);
            self.good -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_is_the_source_s_error() {
        let pool = ChunkPool::new(1000, 2);
        let mut source = Failing { good: 2500 };
        assert!(fill(&mut source, pool.take()).is_ok());
        assert!(fill(&mut source, pool.take()).is_ok());
        let err = fill(&mut source, pool.take()).err().unwrap();
        assert_eq!(err.to_string(), "disk on fire");
    }

    #[derive(Default)]
    struct Seen(Vec<u8>);

    impl Inspect for Seen {
        fn inspect(&mut self, raw: &[u8]) {
            self.0.extend_from_slice(raw);
        }
    }

    #[test]
    fn the_inspector_sees_every_raw_byte_in_order_and_the_stop_flag_ends_the_stream() {
        let codec = crate::pipeline::tests::codec(1);
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_be_bytes()).collect();
        let (tx, mut rx) = mpsc::channel(10_000);
        let encoded = encode(
            io::Cursor::new(data.clone()),
            Seen::default(),
            tx,
            &codec,
            &AtomicBool::new(false),
            Meter::of_key("test/artifact"),
        )
        .unwrap();
        assert!(encoded.inspector.0 == data);
        assert_eq!(encoded.raw.1, data.len() as u64);
        use sha2::Digest as _;
        assert_eq!(encoded.raw.0, hex::encode(sha2::Sha256::digest(&data)));
        let mut stored = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            stored.extend_from_slice(&chunk);
        }
        assert_eq!(encoded.stored.1, stored.len() as u64);
        assert!(zstd::decode_all(stored.as_slice()).unwrap() == data);

        let (tx, _rx) = mpsc::channel(10_000);
        let stopped = encode(
            io::repeat(1),
            (),
            tx,
            &codec,
            &AtomicBool::new(true),
            Meter::of_key("test/artifact"),
        );
        assert!(matches!(stopped, Err(PipelineError::Aborted)));
    }
}
