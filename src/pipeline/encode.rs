//! Backup direction: raw bytes in, a committed (or aborted) multipart upload out.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::chunk::{ChunkPool, ChunkSender};
use super::compress::Compressor;
use super::sha256::{self, Sha256};
use super::{CHANNEL_DEPTH, Codec, POOLED_CHUNKS, PipelineError, TallyThread};
use crate::storage::manifest::{ArtifactRecord, Compression, Encryption};
use crate::storage::{Storage, Upload};

/// A read of a pipe or socket that returned less than this found it nearly empty: the
/// reader pauses.
const SHORT_READ: usize = 64 * 1024;
/// How long [`ArtifactWriter::read_on_thread`] lets a pipe or socket fill after a short
/// read: at the fastest `pg_dump` seen here (~500 MB/s), a quarter of a 1 MiB pipe.
const REFILL_PAUSE: std::time::Duration = std::time::Duration::from_micros(500);

struct EncodeSummary {
    /// SHA-256 (None when the producer hashes) and size of the raw bytes.
    raw: (Option<String>, u64),
    stored: (String, u64),
}

/// SHA-256 and size of the raw bytes, computed by a producer that writes through a
/// [`BlockingSink`] (see [`ArtifactWriter::create_blocking`]).
#[derive(Debug)]
pub struct RawDigest {
    sha256: String,
    bytes: u64,
    /// SHA-256 of each file's content, by the number [`BlockingSink::begin_file`] gave it.
    files: Vec<String>,
}

impl RawDigest {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// SHA-256 of the content of file number `file` (see [`BlockingSink::begin_file`]).
    pub fn file_sha256(&self, file: usize) -> Option<&str> {
        self.files.get(file).map(String::as_str)
    }
}

type UploadTask = JoinHandle<Result<EncodeSummary, PipelineError>>;

/// Uploads whose writer was dropped before finishing: they abort in the background,
/// and whoever owns the backup can wait for those aborts to complete.
#[derive(Clone, Default)]
pub struct PendingAborts(Arc<Mutex<Vec<UploadTask>>>);

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

/// Writes one artifact through the pipeline into storage.
///
/// Nothing becomes visible until [`ArtifactWriter::finish`] succeeds; dropping the
/// writer, or calling [`ArtifactWriter::abort`], aborts the multipart upload.
pub struct ArtifactWriter {
    name: String,
    key: String,
    format: String,
    compression: Compression,
    encryption: Option<Encryption>,
    /// Buffers of the raw chunks ([`ArtifactWriter::read_on_thread`], [`BlockingSink`]).
    chunks: ChunkPool,
    /// Raw bytes are hashed by the [`BlockingSink`] that writes them, not by the pipeline.
    hashed_by_producer: bool,
    tx: Option<mpsc::Sender<Bytes>>,
    task: Option<UploadTask>,
    aborted: Arc<AtomicBool>,
    pending: PendingAborts,
}

impl ArtifactWriter {
    /// Starts the upload of `key`; `name` and `format` go into the artifact record.
    pub async fn create(
        storage: &Storage,
        codec: &Codec,
        pending: &PendingAborts,
        key: String,
        name: String,
        format: &str,
    ) -> Result<Self, PipelineError> {
        Self::start(storage, codec, pending, key, name, format, false).await
    }

    /// Like [`ArtifactWriter::create`], for a producer on a blocking thread (tar): every raw
    /// byte goes through the returned sink, which hashes it, and each file's content marked
    /// by the producer into a digest of its own as well (see [`BlockingSink`]). Finish with
    /// [`ArtifactWriter::finish_blocking`] and the sink's [`BlockingSink::finish`].
    pub async fn create_blocking(
        storage: &Storage,
        codec: &Codec,
        pending: &PendingAborts,
        key: String,
        name: String,
        format: &str,
    ) -> Result<(Self, BlockingSink), PipelineError> {
        let writer = Self::start(storage, codec, pending, key, name, format, true).await?;
        let sink = BlockingSink::new(writer.tx.clone(), writer.chunks.clone());
        Ok((writer, sink))
    }

    async fn start(
        storage: &Storage,
        codec: &Codec,
        pending: &PendingAborts,
        key: String,
        name: String,
        format: &str,
        hashed_by_producer: bool,
    ) -> Result<Self, PipelineError> {
        let upload = storage.start_upload(&key).await?;
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let aborted = Arc::new(AtomicBool::new(false));
        let encoder = tokio::task::spawn_blocking({
            let codec = codec.clone();
            let aborted = aborted.clone();
            move || encode(in_rx, out_tx, &codec, &aborted, !hashed_by_producer)
        });
        let task = tokio::spawn(upload_task(upload, out_rx, encoder));
        Ok(ArtifactWriter {
            name,
            key,
            format: format.to_string(),
            compression: Compression {
                algorithm: "zstd".into(),
                level: codec.zstd_level,
            },
            encryption: codec.encrypts().then(|| Encryption {
                algorithm: "age-x25519".into(),
                recipients: codec.recipient_fingerprints(),
            }),
            chunks: ChunkPool::new(codec.chunk_size, POOLED_CHUNKS),
            hashed_by_producer,
            tx: Some(in_tx),
            task: Some(task),
            aborted,
            pending: pending.clone(),
        })
    }

    /// Sends one chunk of raw bytes down the pipeline.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), PipelineError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.failure().await)
        }
    }

    /// Copies `reader` (a pipe from a child process) to its end into the pipeline, reading
    /// it as [`ArtifactWriter::read_on_thread`] does; returns the bytes copied.
    pub async fn copy_from<R: Read + Send + 'static>(
        &mut self,
        reader: R,
    ) -> Result<u64, PipelineError> {
        let mut chunks = self.read_on_thread(reader);
        let mut total = 0;
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.map_err(PipelineError::Source)?;
            total += chunk.len() as u64;
            self.write(chunk).await?;
        }
        Ok(total)
    }

    /// Reads `reader` to its end on a blocking thread of its own, in whole chunks, and hands
    /// them over through the returned channel (a read error is its last item). Meant for a
    /// pipe from a child process or a socket taken out of the async runtime, and why: a
    /// pipe or socket watched by `epoll`, as the runtime watches its own, wakes its watcher
    /// for every write of the peer (`pg_dump` writes 4 KiB at a time: ~125,000 wake-ups for
    /// a 500 MB dump), while a blocking read is woken only by data arriving while it waits.
    /// After a short read the thread lets data gather for `REFILL_PAUSE` (a child's pipe
    /// holds 1 MiB, see `targets::process`; a loopback socket's buffer more), so a fast
    /// source is read in large pieces, a slow one at most every pause, and neither waits
    /// for the reader. Measured: on the scale-50 pgbench dump (490 MB) a sixth of the
    /// context switches, 0.1–0.5 machine CPU-seconds less, 1.06x → 0.99x of `pg_dump` alone;
    /// on the 575 MB RDB of the Redis benchmark, a third of the context switches.
    pub fn read_on_thread<R: Read + Send + 'static>(
        &self,
        reader: R,
    ) -> mpsc::Receiver<io::Result<Bytes>> {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let chunks = self.chunks.clone();
        tokio::task::spawn_blocking(move || read_chunks(reader, &chunks, &tx));
        rx
    }

    /// Completes compression, encryption and upload; returns the artifact's record.
    pub async fn finish(self) -> Result<ArtifactRecord, PipelineError> {
        self.complete(None).await
    }

    /// [`ArtifactWriter::finish`] for a writer made by [`ArtifactWriter::create_blocking`],
    /// with the digest of its sink.
    pub async fn finish_blocking(self, raw: RawDigest) -> Result<ArtifactRecord, PipelineError> {
        self.complete(Some(raw)).await
    }

    async fn complete(mut self, raw: Option<RawDigest>) -> Result<ArtifactRecord, PipelineError> {
        if self.hashed_by_producer != raw.is_some() {
            // Fail closed before the upload completes: dropping the writer aborts it.
            return Err(PipelineError::Internal(format!(
                "artifact `{}`: the raw digest must come from {}",
                self.name,
                if self.hashed_by_producer {
                    "its blocking sink"
                } else {
                    "the pipeline"
                }
            )));
        }
        self.tx = None;
        let summary = join(self.task.take()).await?;
        let (raw_sha256, raw_size) = match (summary.raw, raw) {
            ((Some(sha256), size), None) => (sha256, size),
            ((None, size), Some(raw)) if raw.bytes == size => (raw.sha256, size),
            ((_, size), raw) => {
                return Err(PipelineError::Internal(format!(
                    "artifact `{}`: the pipeline carried {size} raw bytes, its producer hashed {}",
                    self.name,
                    raw.map_or(0, |raw| raw.bytes)
                )));
            }
        };
        Ok(ArtifactRecord {
            name: std::mem::take(&mut self.name),
            key: std::mem::take(&mut self.key),
            format: std::mem::take(&mut self.format),
            raw_sha256,
            raw_size,
            stored_sha256: summary.stored.0,
            stored_size: summary.stored.1,
            compression: self.compression.clone(),
            encryption: self.encryption.take(),
        })
    }

    /// Aborts the upload and waits until storage has discarded it.
    pub async fn abort(mut self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.tx = None;
        let _ = join(self.task.take()).await;
    }

    /// The pipeline stopped early: its task knows why.
    async fn failure(&mut self) -> PipelineError {
        self.aborted.store(true, Ordering::SeqCst);
        self.tx = None;
        match join(self.task.take()).await {
            Err(err) => err,
            Ok(_) => PipelineError::Internal("pipeline finished before its input ended".into()),
        }
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropped before finish: fail closed. The flag must be set before the
            // channel closes, so the encoder reads the end of input as an abort.
            self.aborted.store(true, Ordering::SeqCst);
            self.tx = None;
            self.pending.push(task);
        }
    }
}

async fn join(task: Option<UploadTask>) -> Result<EncodeSummary, PipelineError> {
    match task {
        Some(task) => task
            .await
            .map_err(|err| PipelineError::Internal(err.to_string()))?,
        None => Err(PipelineError::Aborted),
    }
}

/// Moves encoded chunks into the multipart upload; completes it only if encoding succeeded.
async fn upload_task(
    mut upload: Upload,
    mut rx: mpsc::Receiver<Bytes>,
    encoder: JoinHandle<Result<EncodeSummary, PipelineError>>,
) -> Result<EncodeSummary, PipelineError> {
    while let Some(chunk) = rx.recv().await {
        if let Err(err) = upload.write(chunk).await {
            drop(rx); // the encoder's next send fails and it stops
            let _ = encoder.await;
            upload.discard().await;
            return Err(err.into());
        }
    }
    let encoded = encoder
        .await
        .unwrap_or_else(|err| Err(PipelineError::Internal(err.to_string())));
    match encoded {
        Ok(summary) => {
            upload.finish().await?;
            Ok(summary)
        }
        Err(err) => {
            upload.discard().await;
            Err(err)
        }
    }
}

/// The blocking half: hash raw bytes (unless the producer does), compress, encrypt, hash
/// stored bytes.
fn encode(
    mut rx: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Bytes>,
    codec: &Codec,
    aborted: &AtomicBool,
    hash_raw: bool,
) -> Result<EncodeSummary, PipelineError> {
    let mut compressor = Compressor::new(codec, out)?;
    std::thread::scope(|scope| {
        let raw = hash_raw.then(|| TallyThread::spawn(scope));
        let mut raw_bytes = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            if let Some(raw) = &raw {
                raw.update(&chunk)?;
            }
            raw_bytes += chunk.len() as u64;
            compressor.write_all(&chunk)?;
        }
        if aborted.load(Ordering::SeqCst) {
            return Err(PipelineError::Aborted);
        }
        let stored = compressor.finish()?;
        let raw_sha256 = raw.map(TallyThread::finish).transpose()?;
        Ok(EncodeSummary {
            raw: (raw_sha256.map(|(sha256, _)| sha256), raw_bytes),
            stored,
        })
    })
}

/// The loop of [`ArtifactWriter::read_on_thread`]: fills chunks from `reader` and sends
/// each one when full, the last one at the reader's end; stops at a read error (sent as
/// the last item) or when the receiver is gone.
fn read_chunks(mut reader: impl Read, chunks: &ChunkPool, tx: &mpsc::Sender<io::Result<Bytes>>) {
    loop {
        let mut chunk = chunks.take();
        let mut ended = false;
        while !chunk.is_full() {
            match reader.read(chunk.spare()) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    chunk.advance(n);
                    if n < SHORT_READ && !chunk.is_full() {
                        std::thread::sleep(REFILL_PAUSE);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    let _ = tx.blocking_send(Err(err));
                    return;
                }
            }
        }
        // A closed channel: the writer gave up, and nobody wants the rest.
        if (!chunk.is_empty() && tx.blocking_send(Ok(chunk.freeze())).is_err()) || ended {
            return;
        }
    }
}

/// Raw bytes from a blocking producer into an [`ArtifactWriter`], in chunks.
///
/// The producer only fills chunks: the stream's SHA-256, and that of each file whose
/// content it marks ([`BlockingSink::begin_file`] … [`BlockingSink::end_file`]), are
/// computed on a thread of their own, from the same chunks the upload gets (`Bytes`
/// clones). Measured on the documents benchmark (2.2 GB, 20,000 files): hashing was 1.6
/// of the tar thread's 2.6 CPU-seconds, and that thread set the pace of the whole backup.
pub struct BlockingSink {
    out: ChunkSender,
    /// File content in the chunk being filled: which file, and where in the chunk.
    spans: Vec<Span>,
    /// The file whose content is being written, if any.
    file: Option<usize>,
    files: usize,
    hasher: HashThread,
    raw_bytes: u64,
}

/// Bytes `range` of a chunk are content of file number `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    file: usize,
    range: std::ops::Range<usize>,
}

impl BlockingSink {
    fn new(tx: Option<mpsc::Sender<Bytes>>, chunks: ChunkPool) -> Self {
        BlockingSink {
            out: ChunkSender::new(tx, chunks, "the artifact upload stopped"),
            spans: Vec::new(),
            file: None,
            files: 0,
            hasher: HashThread::spawn(),
            raw_bytes: 0,
        }
    }

    /// A sink whose chunks go to the returned receiver instead of an upload.
    #[cfg(test)]
    pub(crate) fn detached(chunk_size: usize) -> (Self, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(1024);
        let chunks = ChunkPool::new(chunk_size, POOLED_CHUNKS);
        (BlockingSink::new(Some(tx), chunks), rx)
    }

    /// Sends what is buffered and waits for the hashes; returns the digest of every byte
    /// written and of each file's content, for [`ArtifactWriter::finish_blocking`].
    pub fn finish(mut self) -> io::Result<RawDigest> {
        self.send()?;
        let hashed = self.hasher.finish()?;
        if hashed.bytes != self.raw_bytes {
            return Err(io::Error::other(format!(
                "{} bytes were written and {} hashed",
                self.raw_bytes, hashed.bytes
            )));
        }
        // Files without content never reached the hashing thread.
        let empty = Sha256::new().finish_hex();
        let mut files = vec![empty; self.files];
        for (file, sha256) in hashed.files {
            if let Some(slot) = files.get_mut(file) {
                *slot = sha256;
            }
        }
        Ok(RawDigest {
            sha256: hashed.sha256,
            bytes: self.raw_bytes,
            files,
        })
    }

    /// Starts a file: the bytes written until [`BlockingSink::end_file`] are its content.
    /// Returns its number, for [`RawDigest::file_sha256`].
    pub fn begin_file(&mut self) -> usize {
        self.files += 1;
        self.file = Some(self.files - 1);
        self.files - 1
    }

    pub fn end_file(&mut self) {
        self.file = None;
    }

    /// Reads up to `limit` bytes of `reader` straight into the chunk being filled, with no
    /// buffer in between. Returns the number of bytes read, 0 at the reader's end.
    pub fn read_into(&mut self, reader: &mut impl Read, limit: usize) -> io::Result<usize> {
        let chunk = self.room()?;
        let at = chunk.len();
        let spare = chunk.spare();
        let want = limit.min(spare.len());
        let n = loop {
            match reader.read(&mut spare[..want]) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        };
        chunk.advance(n);
        self.filled(at, n);
        Ok(n)
    }

    /// The chunk being filled, with room in it: a full one is sent first (as by
    /// [`BlockingSink::send`]).
    fn room(&mut self) -> io::Result<&mut super::chunk::Chunk> {
        let (spans, hasher) = (&mut self.spans, &self.hasher);
        self.out
            .room_with(|chunk| hasher.send(chunk.clone(), std::mem::take(spans)))
    }

    /// Counts `n` bytes written at `at` in the chunk, as content of the open file if any.
    fn filled(&mut self, at: usize, n: usize) {
        self.raw_bytes += n as u64;
        let Some(file) = self.file else { return };
        match self.spans.last_mut() {
            Some(span) if span.file == file && span.range.end == at => span.range.end += n,
            _ => self.spans.push(Span {
                file,
                range: at..at + n,
            }),
        }
    }

    /// Sends the chunk being filled to the upload and, with its spans, to the hashing thread.
    fn send(&mut self) -> io::Result<()> {
        let (spans, hasher) = (&mut self.spans, &self.hasher);
        self.out
            .send_with(|chunk| hasher.send(chunk.clone(), std::mem::take(spans)))
    }
}

impl Write for BlockingSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = self.room()?;
            let at = chunk.len();
            let n = chunk.fill_from(rest);
            self.filled(at, n);
            rest = &rest[n..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// What the hashing thread of a [`BlockingSink`] found.
struct StreamHashes {
    sha256: String,
    bytes: u64,
    /// (file number, SHA-256) of each file that had content, in order.
    files: Vec<(usize, String)>,
}

/// The hashing thread of a [`BlockingSink`].
struct HashThread {
    tx: std::sync::mpsc::SyncSender<(Bytes, Vec<Span>)>,
    thread: std::thread::JoinHandle<StreamHashes>,
}

impl HashThread {
    fn spawn() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_DEPTH);
        let thread = std::thread::spawn(move || hash_stream(rx));
        HashThread { tx, thread }
    }

    fn send(&self, chunk: Bytes, spans: Vec<Span>) -> io::Result<()> {
        self.tx
            .send((chunk, spans))
            .map_err(|_| io::Error::other("the hashing thread stopped"))
    }

    fn finish(self) -> io::Result<StreamHashes> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))
    }
}

/// Hashes every chunk into the stream's digest, and each span of file content into that
/// file's digest as well (both at once: see [`sha256::update_both`]).
fn hash_stream(rx: std::sync::mpsc::Receiver<(Bytes, Vec<Span>)>) -> StreamHashes {
    let mut raw = Sha256::new();
    let mut bytes = 0u64;
    let mut files = Vec::new();
    let mut current: Option<(usize, Sha256)> = None;
    for (chunk, spans) in rx {
        bytes += chunk.len() as u64;
        let mut at = 0;
        for span in spans {
            raw.update(&chunk[at..span.range.start]);
            let digest = match &mut current {
                Some((file, digest)) if *file == span.file => digest,
                _ => {
                    if let Some((file, digest)) = current.take() {
                        files.push((file, digest.finish_hex()));
                    }
                    &mut current.insert((span.file, Sha256::new())).1
                }
            };
            sha256::update_both(&mut raw, digest, &chunk[span.range.clone()]);
            at = span.range.end;
        }
        raw.update(&chunk[at..]);
    }
    if let Some((file, digest)) = current {
        files.push((file, digest.finish_hex()));
    }
    StreamHashes {
        sha256: raw.finish_hex(),
        bytes,
        files,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn collect(mut rx: mpsc::Receiver<io::Result<Bytes>>) -> Vec<io::Result<Bytes>> {
        let mut items = Vec::new();
        while let Some(item) = rx.blocking_recv() {
            items.push(item);
        }
        items
    }

    #[test]
    fn a_pipe_written_in_small_pieces_arrives_whole_in_full_chunks() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let expected = data.clone();
        let producer = std::thread::spawn(move || {
            for piece in data.chunks(4096) {
                writer.write_all(piece).unwrap();
            }
        });
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let pool = ChunkPool::new(64 * 1024, POOLED_CHUNKS);
        let consumer = std::thread::spawn(move || collect(rx));
        read_chunks(reader, &pool, &tx);
        drop(tx);
        producer.join().unwrap();
        let chunks: Vec<Bytes> = consumer
            .join()
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let (last, full) = chunks.split_last().unwrap();
        assert!(full.iter().all(|chunk| chunk.len() == 64 * 1024));
        assert_eq!(last.len(), expected.len() % (64 * 1024));
        assert_eq!(chunks.concat(), expected);
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
    fn a_read_error_is_the_last_item_after_the_full_chunks_before_it() {
        let (tx, rx) = mpsc::channel(64);
        let pool = ChunkPool::new(1000, POOLED_CHUNKS);
        read_chunks(Failing { good: 2500 }, &pool, &tx);
        drop(tx);
        let items = collect(rx);
        assert_eq!(items.len(), 3, "two full chunks, then the error");
        assert_eq!(items[0].as_ref().unwrap().len(), 1000);
        assert_eq!(items[1].as_ref().unwrap().len(), 1000);
        let err = items[2].as_ref().unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }

    #[test]
    fn a_blocking_sink_hashes_the_stream_and_each_file_across_chunk_boundaries() {
        use sha2::Digest;
        let hex = |data: &[u8]| hex::encode(sha2::Sha256::digest(data));
        // Files of every shape around a 1000-byte chunk, with headers between them: empty,
        // inside one chunk, across several, ending exactly at a chunk's end; read and written.
        let sizes = [0usize, 10, 999, 1000, 1001, 4096, 0, 3000, 64, 2500];
        for chunk_size in [64, 1000, 4096] {
            let (mut sink, mut rx) = BlockingSink::detached(chunk_size);
            let mut expected_files = Vec::new();
            let mut stream = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let header = vec![b'h'; 100 + i * 37];
                sink.write_all(&header).unwrap();
                stream.extend_from_slice(&header);
                let content: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
                let number = sink.begin_file();
                if i % 2 == 0 {
                    let mut reader = &content[..];
                    while sink.read_into(&mut reader, 700).unwrap() > 0 {}
                } else {
                    sink.write_all(&content).unwrap();
                }
                sink.end_file();
                stream.extend_from_slice(&content);
                expected_files.push((number, hex(&content)));
            }
            sink.write_all(b"trailer").unwrap();
            stream.extend_from_slice(b"trailer");
            let raw = sink.finish().unwrap();
            let mut sent = Vec::new();
            while let Ok(chunk) = rx.try_recv() {
                assert!(chunk.len() <= chunk_size);
                sent.extend_from_slice(&chunk);
            }
            assert_eq!(sent, stream, "chunk size {chunk_size}");
            assert_eq!(raw.bytes(), stream.len() as u64);
            assert_eq!(raw.sha256(), hex(&stream), "chunk size {chunk_size}");
            for (number, sha256) in &expected_files {
                assert_eq!(
                    raw.file_sha256(*number),
                    Some(sha256.as_str()),
                    "file {number}"
                );
            }
            assert_eq!(raw.file_sha256(sizes.len()), None);
        }
    }

    #[test]
    fn a_sink_whose_upload_stopped_fails_its_writes() {
        let (mut sink, rx) = BlockingSink::detached(16);
        drop(rx);
        let err = sink.write_all(&[0; 64]).unwrap_err();
        assert_eq!(err.to_string(), "the artifact upload stopped");
    }

    #[test]
    fn reading_stops_when_the_receiver_is_gone() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let pool = ChunkPool::new(1000, POOLED_CHUNKS);
        // An endless reader: only the closed channel can end the loop.
        read_chunks(io::repeat(1), &pool, &tx);
    }
}
