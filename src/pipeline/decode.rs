//! Restore direction: a stored artifact in, verified raw bytes out.
//!
//! Both hashes are checked at the end of the stream, before the reader reports its end:
//! a consumer that reads to EOF without an error has received exactly the bytes the
//! manifest describes. With a staging directory (`restore.verify_first`), the stored bytes
//! are first written to an unnamed staging file and their hash checked before the first
//! decoded byte is handed out: a consumer then never sees a byte of a corrupt artifact.

use std::io::{self, Read, Seek};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;

use super::{CHANNEL_DEPTH, Keyring, PipelineError, Tally};
use crate::storage::manifest::ArtifactRecord;
use crate::storage::{Storage, StorageError};

/// Decoded bytes of one artifact, as an `AsyncRead`.
pub type ArtifactReader = StreamReader<ReceiverStream<io::Result<Bytes>>, Bytes>;

pub struct DecodedArtifact {
    pub reader: ArtifactReader,
    pub verification: Verification,
}

/// The outcome of the hash checks, known once the whole artifact has passed.
///
/// While it is held, decoding continues to the end even if the reader is dropped
/// (so a consumer that stops early still learns whether the artifact is intact).
pub struct Verification {
    task: Option<JoinHandle<Result<(), PipelineError>>>,
    wanted: Arc<AtomicBool>,
}

impl Verification {
    pub async fn result(mut self) -> Result<(), PipelineError> {
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|err| PipelineError::Internal(err.to_string()))?,
            None => Err(PipelineError::Internal("verification already taken".into())),
        }
    }
}

impl Drop for Verification {
    fn drop(&mut self) {
        self.wanted.store(false, Ordering::SeqCst);
    }
}

/// Starts downloading and decoding `record`. With `staging`, the stored bytes are first
/// written to a staging file in that directory and their hash checked: this returns only
/// then, with the error if they are not the manifest's.
pub async fn open_artifact(
    storage: &Storage,
    record: &ArtifactRecord,
    keyring: &Keyring,
    chunk_size: usize,
    staging: Option<&Path>,
) -> Result<DecodedArtifact, PipelineError> {
    if record.encryption.is_some() && keyring.is_empty() {
        return Err(PipelineError::NoIdentity(record.name.clone()));
    }
    let mut download = storage.get_stream(&record.key).await?;
    let (in_tx, in_rx) = mpsc::channel(CHANNEL_DEPTH);
    let meter = crate::progress::Meter::of_key(&record.key);
    tokio::spawn(async move {
        while let Some(item) = download.next().await {
            if let Ok(bytes) = &item {
                meter.add(bytes.len());
            }
            let failed = item.is_err();
            if in_tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let downloaded = ChannelReader {
        rx: in_rx,
        current: Bytes::new(),
        tally: Tally::default(),
        failed: None,
    };
    let source = match staging {
        Some(dir) => {
            let (record, dir) = (record.clone(), dir.to_path_buf());
            let staged = tokio::task::spawn_blocking(move || stage(downloaded, &record, &dir))
                .await
                .map_err(|err| PipelineError::Internal(err.to_string()))??;
            Stored::Staged(io::BufReader::with_capacity(chunk_size, staged))
        }
        None => Stored::Streamed(downloaded),
    };
    let (out_tx, out_rx) = mpsc::channel(CHANNEL_DEPTH);
    let wanted = Arc::new(AtomicBool::new(true));
    let task = tokio::task::spawn_blocking({
        let record = record.clone();
        let keyring = keyring.clone();
        let wanted = wanted.clone();
        move || {
            let result = decode(source, &out_tx, &record, &keyring, chunk_size, &wanted);
            if let Err(err) = &result {
                let _ = out_tx.blocking_send(Err(io::Error::other(err.to_string())));
            }
            result
        }
    });
    Ok(DecodedArtifact {
        reader: StreamReader::new(ReceiverStream::new(out_rx)),
        verification: Verification {
            task: Some(task),
            wanted,
        },
    })
}

/// Where the stored bytes are decoded from.
enum Stored {
    /// The download itself; the stored hash is checked at its end.
    Streamed(ChannelReader),
    /// A staging file whose stored hash was checked already.
    Staged(io::BufReader<std::fs::File>),
}

/// Writes the download to an unnamed, owner-only staging file in `dir` and checks the
/// stored size and hash; returns the file rewound.
fn stage(
    mut download: ChannelReader,
    record: &ArtifactRecord,
    dir: &Path,
) -> Result<std::fs::File, PipelineError> {
    let staging_error = |reason: String| PipelineError::Staging {
        dir: dir.display().to_string(),
        reason,
    };
    let free = rustix::fs::statvfs(dir)
        .map(|stat| stat.f_bavail.saturating_mul(stat.f_frsize))
        .map_err(|err| staging_error(err.to_string()))?;
    if free < record.stored_size {
        return Err(staging_error(format!(
            "{free} bytes free, artifact `{}` needs {} (free space, choose another \
             restore.staging_dir, or turn restore.verify_first off)",
            record.name, record.stored_size
        )));
    }
    // O_TMPFILE where the file system has it: no name, mode 0600, gone once closed.
    let mut file = tempfile::tempfile_in(dir).map_err(|err| staging_error(err.to_string()))?;
    // Never more than the manifest says (plus one byte, to notice): a longer download fails
    // the size check without filling the disk first.
    let copied = io::copy(&mut (&mut download).take(record.stored_size + 1), &mut file);
    if let Some(err) = download.failed.take() {
        return Err(err.into());
    }
    copied.map_err(|err| staging_error(err.to_string()))?;
    check(
        record,
        "stored",
        &record.stored_sha256,
        record.stored_size,
        download.tally.finish(),
    )?;
    file.rewind()
        .map_err(|err| staging_error(err.to_string()))?;
    Ok(file)
}

fn decode(
    source: Stored,
    out: &mpsc::Sender<io::Result<Bytes>>,
    record: &ArtifactRecord,
    keyring: &Keyring,
    chunk_size: usize,
    wanted: &AtomicBool,
) -> Result<(), PipelineError> {
    let mut raw = Tally::default();
    let mut decode_from = |source: &mut dyn Read| {
        decode_into(source, out, record, keyring, chunk_size, wanted, &mut raw)
    };
    let decoded = match source {
        Stored::Staged(mut file) => {
            let decoded = decode_from(&mut file);
            if !wanted.load(Ordering::SeqCst) {
                return Err(PipelineError::Aborted);
            }
            decoded
        }
        Stored::Streamed(mut download) => {
            let decoded = decode_from(&mut download);
            if !wanted.load(Ordering::SeqCst) {
                return Err(PipelineError::Aborted);
            }
            // Hash whatever the decoders left unread (trailing bytes, or the rest after an
            // error).
            let drained = io::copy(&mut download, &mut io::sink());
            if let Some(err) = download.failed.take() {
                return Err(err.into());
            }
            let stored = download.tally.finish();
            if let Err(err) = drained {
                return Err(PipelineError::Internal(err.to_string()));
            }
            check(
                record,
                "stored",
                &record.stored_sha256,
                record.stored_size,
                stored,
            )?;
            decoded
        }
    };
    decoded.map_err(|reason| PipelineError::Decode {
        artifact: record.name.clone(),
        reason,
    })?;
    check(
        record,
        "raw",
        &record.raw_sha256,
        record.raw_size,
        raw.finish(),
    )
}

fn decode_into(
    source: &mut dyn Read,
    out: &mpsc::Sender<io::Result<Bytes>>,
    record: &ArtifactRecord,
    keyring: &Keyring,
    chunk_size: usize,
    wanted: &AtomicBool,
    raw: &mut Tally,
) -> Result<(), String> {
    let decrypted: Box<dyn Read + '_> = if record.encryption.is_some() {
        let identities = keyring
            .identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity);
        let decryptor = age::Decryptor::new(source).map_err(|err| format!("age: {err}"))?;
        Box::new(
            decryptor
                .decrypt(identities)
                .map_err(|err| format!("age: {err}"))?,
        )
    } else {
        Box::new(source)
    };
    let mut zstd = zstd::stream::read::Decoder::new(decrypted).map_err(|err| err.to_string())?;
    let mut consumer_gone = false;
    loop {
        let mut buf = vec![0u8; chunk_size];
        let n = zstd.read(&mut buf).map_err(|err| err.to_string())?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        raw.update(&buf);
        if !consumer_gone && out.blocking_send(Ok(Bytes::from(buf))).is_err() {
            consumer_gone = true;
        }
        if consumer_gone && !wanted.load(Ordering::SeqCst) {
            return Err("abandoned by its reader".into());
        }
    }
}

fn check(
    record: &ArtifactRecord,
    layer: &'static str,
    expected: &str,
    expected_size: u64,
    (actual, actual_size): (String, u64),
) -> Result<(), PipelineError> {
    if actual == expected && actual_size == expected_size {
        Ok(())
    } else {
        Err(PipelineError::Integrity {
            artifact: record.key.clone(),
            layer,
            expected: expected.to_string(),
            actual,
            expected_size,
            actual_size,
        })
    }
}

/// Blocking `Read` over the download channel; hashes stored bytes as they arrive.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    current: Bytes,
    tally: Tally,
    failed: Option<StorageError>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => {
                    self.tally.update(&bytes);
                    self.current = bytes;
                }
                Some(Err(err)) => {
                    let message = err.to_string();
                    self.failed = Some(err);
                    return Err(io::Error::other(message));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
