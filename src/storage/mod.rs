//! Object storage: the local directory `backups/` by default, S3-compatible when a bucket is set.
//!
//! Everything above this module speaks in keys relative to the configured prefix
//! (`postgres/<id>/manifest.json`); this module maps them onto `object_store`.

pub mod catalog;
pub mod layout;
mod local_upload;
pub mod manifest;
pub mod signing;

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutPayload, PutPayloadMut, RetryConfig,
};
use secrecy::ExposeSecret;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use crate::buffers::{Chunk, ChunkPool};
use crate::config::StorageSettings;

/// Pauses between retries of one S3 request: from 1 s, each drawn between 1 s and three
/// times the last, at most 15 s. `object_store`'s own (from 100 ms, twice the last) spends
/// its ten retries in about two seconds, so a storage restart of a few seconds failed the
/// whole backup attempt; with these, `max_retries` (20) reaches `retry_timeout` (3 min)
/// first, and an outage shorter than that costs a pause, not a new dump.
const STORAGE_BACKOFF: BackoffConfig = BackoffConfig {
    init_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(15),
    base: 3.0,
};

/// Bytes of an S3 object that [`Storage::get_stream`] fetches per request.
const DOWNLOAD_RANGE: u64 = 4 * 1024 * 1024;
/// Largest piece [`Storage::get_stream`] yields from S3.
const DOWNLOAD_SLICE: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage: `{key}` does not exist")]
    NotFound { key: String },
    #[error("storage is misconfigured: {0}")]
    Config(String),
    #[error("storage refused access to `{key}`: {message}")]
    Denied { key: String, message: String },
    #[error("storage error on `{key}`: {message}")]
    Unavailable { key: String, message: String },
    #[error("storage: `{key}` is {size} bytes, more than the {max} it may be")]
    TooLarge { key: String, size: u64, max: u64 },
}

impl StorageError {
    /// Whether trying again later can help (network, server errors) or not (missing, denied).
    pub fn retryable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }

    fn from_io(key: &str, err: std::io::Error) -> Self {
        let key = key.to_string();
        let message = err.to_string();
        match err.kind() {
            std::io::ErrorKind::PermissionDenied => StorageError::Denied { key, message },
            _ => StorageError::Unavailable { key, message },
        }
    }

    fn from_object_store(key: &str, err: object_store::Error) -> Self {
        let key = key.to_string();
        match err {
            object_store::Error::NotFound { .. } => StorageError::NotFound { key },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => StorageError::Denied {
                key,
                message: source.to_string(),
            },
            other => StorageError::Unavailable {
                key,
                message: other.to_string(),
            },
        }
    }
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Key relative to the storage prefix.
    pub key: String,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
    /// A staging file of an unfinished upload into the local directory (`<key>#<digits>`),
    /// which object listings do not show: see [`Storage::list_staging`].
    pub staging: bool,
}

/// The size of the storage and its free bytes (see [`Storage::space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub capacity: u64,
    pub free: u64,
}

/// Handle on the configured object store.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is the local directory: uploads there go through
    /// [`local_upload::LocalUpload`].
    local: Option<Arc<LocalFileSystem>>,
    /// The local directory, for its file system's free space.
    local_dir: Option<std::path::PathBuf>,
    /// S3: the bucket's configured quota (0: none known).
    quota_bytes: u64,
    prefix: String,
    /// Where the store is, for humans and events: `s3://bucket/prefix/` or `file:///dir/`.
    base_location: String,
    part_size: usize,
    parts_in_flight: usize,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("location", &self.base_location)
            .finish()
    }
}

impl Storage {
    /// Opens S3 when `s3_bucket` is set, else the local directory (created if missing).
    pub fn open(settings: &StorageSettings) -> Result<Self, StorageError> {
        let prefix = settings.prefix.trim_matches('/').to_string();
        let mut local = None;
        let mut local_dir = None;
        let (store, root): (Arc<dyn ObjectStore>, String) = if settings.s3_bucket.is_empty() {
            std::fs::create_dir_all(&settings.local_dir).map_err(|err| {
                StorageError::Config(format!(
                    "cannot create storage directory {}: {err}",
                    settings.local_dir.display()
                ))
            })?;
            let dir = std::fs::canonicalize(&settings.local_dir).map_err(|err| {
                StorageError::Config(format!("{}: {err}", settings.local_dir.display()))
            })?;
            let store = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|err| StorageError::Config(err.to_string()))?
                .with_automatic_cleanup(true)
                // A backup that reports success must survive a power cut.
                .with_fsync(true);
            let store = Arc::new(store);
            local = Some(store.clone());
            local_dir = Some(dir.clone());
            (store, format!("file://{}/", dir.display()))
        } else {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&settings.s3_bucket)
                .with_region(&settings.s3_region)
                .with_conditional_put(S3ConditionalPut::Disabled)
                .with_unsigned_payload(settings.s3_unsigned_payload)
                .with_virtual_hosted_style_request(false)
                .with_client_options(
                    ClientOptions::new()
                        .with_connect_timeout(settings.connect_timeout.0)
                        .with_timeout(settings.request_timeout.0),
                )
                .with_retry(RetryConfig {
                    max_retries: settings.max_retries as usize,
                    retry_timeout: settings.retry_timeout.0,
                    backoff: STORAGE_BACKOFF,
                });
            if !settings.s3_endpoint.is_empty() {
                builder = builder
                    .with_endpoint(&settings.s3_endpoint)
                    .with_allow_http(settings.s3_endpoint.starts_with("http://"));
            }
            if !settings.s3_access_key.is_empty() {
                builder = builder
                    .with_access_key_id(&settings.s3_access_key)
                    .with_secret_access_key(settings.s3_secret_key.expose_secret());
            }
            let store = builder
                .build()
                .map_err(|err| StorageError::Config(err.to_string()))?;
            (Arc::new(store), format!("s3://{}/", settings.s3_bucket))
        };
        let base_location = if prefix.is_empty() {
            root
        } else {
            format!("{root}{prefix}/")
        };
        Ok(Storage {
            store,
            local,
            local_dir,
            quota_bytes: settings.quota_bytes,
            prefix,
            base_location,
            part_size: settings.part_size_mib as usize * 1024 * 1024,
            parts_in_flight: settings.parts_in_flight as usize,
        })
    }

    /// How large the storage is and how much of it is free, where that can be known: the
    /// local directory's file system, or a bucket with a configured quota of which `used`
    /// bytes are taken.
    pub fn space(&self, used: u64) -> Option<Space> {
        match &self.local_dir {
            Some(dir) => {
                let stats = rustix::fs::statvfs(dir).ok()?;
                Some(Space {
                    capacity: stats.f_blocks.saturating_mul(stats.f_frsize),
                    free: stats.f_bavail.saturating_mul(stats.f_frsize),
                })
            }
            None if self.quota_bytes > 0 => Some(Space {
                capacity: self.quota_bytes,
                free: self.quota_bytes.saturating_sub(used),
            }),
            None => None,
        }
    }

    /// Human- and event-facing location of a key (`s3://bucket/prefix/key`).
    pub fn location_of(&self, key: &str) -> String {
        format!("{}{}", self.base_location, key)
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn relative_key(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix)
                .map(|rest| rest.trim_start_matches('/'))
                .unwrap_or(full)
                .to_string()
        }
    }

    /// Stores a small object in one request (manifests, markers).
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.store
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|err| StorageError::from_object_store(key, err))
    }

    /// Reads a small object whole (manifests, markers); one larger than `max` bytes (what
    /// the bucket holds is as untrusted as any input) is refused before it is read.
    pub async fn get_bytes(&self, key: &str, max: u64) -> Result<Bytes, StorageError> {
        let result = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|err| StorageError::from_object_store(key, err))?;
        if result.meta.size > max {
            return Err(StorageError::TooLarge {
                key: key.to_string(),
                size: result.meta.size,
                max,
            });
        }
        result
            .bytes()
            .await
            .map_err(|err| StorageError::from_object_store(key, err))
    }

    /// Streams an object in chunks, without holding it in memory.
    ///
    /// From S3 the object is read in ranges of `DOWNLOAD_RANGE`, each fetched whole by a
    /// request of its own, the next one while the reader consumes the last: every request is
    /// paced by the network, never by the reader. One GET streamed to a reader that pauses
    /// (`pg_restore` waiting on a lock, a slow disk) is cut by the request timeout, which
    /// covers the response body, and its resumptions all draw on one retry budget counted
    /// from the first request: any restore longer than `retry_timeout` failed. Memory: three
    /// range buffers, reused.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StorageError>>, StorageError> {
        let path = self.path(key);
        let owned_key = key.to_string();
        if self.local.is_some() {
            let result = self
                .store
                .get(&path)
                .await
                .map_err(|err| StorageError::from_object_store(key, err))?;
            return Ok(Box::pin(result.into_stream().map_err(move |err| {
                StorageError::from_object_store(&owned_key, err)
            })));
        }
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|err| StorageError::from_object_store(key, err))?;
        let ranges = byte_ranges(meta.size, DOWNLOAD_RANGE);
        // The range being read, the next one, and the rest of the one before it in the
        // reader's buffers: three buffers, reused for the whole object.
        let buffers = ChunkPool::new(DOWNLOAD_RANGE as usize, 3);
        let store = self.store.clone();
        let fetch = move |range: std::ops::Range<u64>| {
            let (store, path, key) = (store.clone(), path.clone(), owned_key.clone());
            let buffer = buffers.take();
            // Every range from the same version of the object.
            let options = GetOptions {
                range: Some(GetRange::Bounded(range)),
                if_match: meta.e_tag.clone(),
                ..GetOptions::default()
            };
            // A task of its own: it reads its response while the reader is busy elsewhere
            // (a future that only the reader polls would leave it unread until then).
            let task = tokio::spawn(async move {
                fetch_range(&*store, &path, options, buffer)
                    .await
                    .map_err(|err| StorageError::from_object_store(&key, err))
            });
            let key = owned_key.clone();
            AbortOnDropHandle::new(task).map(move |joined| {
                joined.unwrap_or_else(|err| {
                    Err(StorageError::Unavailable {
                        key,
                        message: format!("a range download stopped: {err}"),
                    })
                })
            })
        };
        // A range is handed on in slices, so a channel of chunks behind this stream holds
        // slices, not whole ranges.
        let slices = futures::stream::iter(ranges)
            .map(fetch)
            .buffered(2)
            .map_ok(|range| futures::stream::iter(slices_of(range, DOWNLOAD_SLICE).map(Ok)))
            .try_flatten();
        Ok(Box::pin(slices))
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(StorageError::from_object_store(key, err)),
        }
    }

    /// Lists every object whose key starts with `dir` (a `/`-terminated directory key).
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let dir_path = self.path(dir.trim_end_matches('/'));
        let objects: Vec<_> = self
            .store
            .list(Some(&dir_path))
            .try_collect()
            .await
            .map_err(|err| StorageError::from_object_store(dir, err))?;
        Ok(objects
            .into_iter()
            .map(|meta| ObjectInfo {
                key: self.relative_key(&meta.location),
                size: meta.size,
                last_modified: meta.last_modified,
                staging: false,
            })
            .collect())
    }

    /// Lists the immediate sub-directories of `dir` (their keys end with `/`).
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StorageError> {
        let trimmed = dir.trim_end_matches('/');
        let dir_path = (!trimmed.is_empty() || !self.prefix.is_empty()).then(|| self.path(trimmed));
        let listing = self
            .store
            .list_with_delimiter(dir_path.as_ref())
            .await
            .map_err(|err| StorageError::from_object_store(dir, err))?;
        Ok(listing
            .common_prefixes
            .iter()
            .map(|path| format!("{}/", self.relative_key(path)))
            .collect())
    }

    /// Staging files of uploads into the local directory under `dir` that never completed
    /// (a process killed mid-backup leaves them): debris that only prune sees. Empty for S3,
    /// where unfinished multipart uploads are the bucket's lifecycle rule's business.
    pub async fn list_staging(&self, dir: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let Some(local) = &self.local else {
            return Ok(Vec::new());
        };
        let root = local
            .path_to_filesystem(&self.path(dir.trim_end_matches('/')))
            .map_err(|err| StorageError::from_object_store(dir, err))?;
        local_upload::run_blocking(move || local_upload::staging_files(&root))
            .await
            .map_err(|err| StorageError::from_io(dir, err))
            .map(|files| {
                files
                    .into_iter()
                    .map(|file| ObjectInfo {
                        key: format!("{}/{}", dir.trim_end_matches('/'), file.relative),
                        size: file.size,
                        last_modified: file.modified,
                        staging: true,
                    })
                    .collect()
            })
    }

    /// Deletes an object, or a staging file found by [`Storage::list_staging`].
    pub async fn delete_object(&self, object: &ObjectInfo) -> Result<(), StorageError> {
        match (&self.local, object.staging) {
            (Some(local), true) => {
                let (name, digits) = object.key.rsplit_once('#').unwrap_or((&object.key, ""));
                let mut path = local
                    .path_to_filesystem(&self.path(name))
                    .map_err(|err| StorageError::from_object_store(&object.key, err))?
                    .into_os_string();
                path.push(format!("#{digits}"));
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(err) => Err(StorageError::from_io(&object.key, err)),
                }
            }
            _ => self.delete(&object.key).await,
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(StorageError::from_object_store(key, err)),
        }
    }

    /// Starts a multipart upload; memory is bounded by part size × (parts in flight + 1).
    pub async fn start_upload(&self, key: &str) -> Result<Upload, StorageError> {
        let upload: Box<dyn object_store::MultipartUpload> = match &self.local {
            Some(local) => {
                let dest = local
                    .path_to_filesystem(&self.path(key))
                    .map_err(|err| StorageError::from_object_store(key, err))?;
                let upload =
                    local_upload::run_blocking(move || local_upload::LocalUpload::create(dest))
                        .await
                        .map_err(|err| StorageError::from_io(key, err))?;
                Box::new(upload)
            }
            None => self
                .store
                .put_multipart(&self.path(key))
                .await
                .map_err(|err| StorageError::from_object_store(key, err))?,
        };
        let limited = self.local.is_none();
        Ok(Upload {
            key: key.to_string(),
            upload,
            buffer: PutPayloadMut::new(),
            base_part_size: self.part_size,
            // The local directory takes any number of parts: they keep their size there.
            grow_after: if limited { GROW_AFTER } else { usize::MAX },
            parts_sent: 0,
            max_parts: limited.then_some(S3_MAX_PARTS),
            parts: tokio::task::JoinSet::new(),
            parts_in_flight: self.parts_in_flight,
        })
    }
}

/// Reads the range `options` asks for into `buffer`, whole.
async fn fetch_range(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    options: GetOptions,
    mut buffer: Chunk,
) -> object_store::Result<Bytes> {
    let result = store.get_opts(path, options).await?;
    let wanted = (result.range.end - result.range.start) as usize;
    let mut body = result.into_stream();
    while let Some(piece) = body.next().await {
        let piece = piece?;
        if buffer.fill_from(&piece) < piece.len() {
            break;
        }
    }
    if buffer.len() != wanted || body.next().await.is_some() {
        return Err(object_store::Error::Generic {
            store: "S3",
            source: format!(
                "asked for {wanted} bytes of {path}, the response held {} or more",
                buffer.len()
            )
            .into(),
        });
    }
    Ok(buffer.freeze())
}

/// `bytes` in consecutive slices of at most `size` bytes (sharing its memory).
fn slices_of(mut bytes: Bytes, size: usize) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || (!bytes.is_empty()).then(|| bytes.split_to(size.min(bytes.len()))))
}

/// `0..size` cut into consecutive ranges of `step` bytes (the last one shorter).
fn byte_ranges(size: u64, step: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    (0..size)
        .step_by(step as usize)
        .map(move |start| start..(start + step).min(size))
}

/// S3 completes a multipart upload of at most this many parts.
const S3_MAX_PARTS: usize = 10_000;
/// Parts of the configured size until this many have been sent; then the size doubles every
/// [`GROW_EVERY`] parts. A stream's size is not known in advance: this keeps memory at the
/// configured part size for all but huge artifacts (40 GiB at 8 MiB parts) and still fits
/// 67,000 parts' worth (523 GiB at 8 MiB) into S3's 10,000.
const GROW_AFTER: usize = 5_000;
const GROW_EVERY: usize = 1_000;

/// The size of part `index` (from 0) of an upload whose configured part size is `base`, when
/// parts grow after `grow_after` of them ([`GROW_AFTER`] but in tests).
fn part_size_at(base: usize, index: usize, grow_after: usize) -> usize {
    match index.checked_sub(grow_after) {
        None => base,
        Some(past) => base << (past / GROW_EVERY + 1).min(16),
    }
}

/// A multipart upload in progress. Either [`Upload::finish`] or [`Upload::abort`] ends it.
///
/// Like `object_store`'s `WriteMultipart` (parts of the configured size, larger only for huge
/// artifacts: see `part_size_at`; at most `parts_in_flight`
/// uploading at once, chunks kept as they are, not copied), except for failures: a part or
/// the completion that fails is reported as itself, whether or not the abort that follows
/// reaches the store. `WriteMultipart::finish` reports the abort's error instead, so storage
/// lost mid-upload read "Error performing DELETE" rather than the upload that failed.
pub struct Upload {
    key: String,
    upload: Box<dyn MultipartUpload>,
    /// Bytes of the part being gathered.
    buffer: PutPayloadMut,
    /// The configured part size; see `part_size_at`.
    base_part_size: usize,
    grow_after: usize,
    parts_sent: usize,
    /// S3's limit on parts; none for the local directory.
    max_parts: Option<usize>,
    parts: tokio::task::JoinSet<object_store::Result<()>>,
    parts_in_flight: usize,
}

impl Upload {
    /// Appends bytes, waiting while too many parts are in flight (back-pressure).
    pub async fn write(&mut self, mut bytes: Bytes) -> Result<(), StorageError> {
        while !bytes.is_empty() {
            let part_size = part_size_at(self.base_part_size, self.parts_sent, self.grow_after);
            let missing = part_size - self.buffer.content_length();
            if bytes.len() < missing {
                self.buffer.push(bytes);
                break;
            }
            self.buffer.push(bytes.split_to(missing));
            self.send_part().await?;
        }
        Ok(())
    }

    /// Completes the upload: the object becomes visible. On failure the upload is aborted.
    pub async fn finish(mut self) -> Result<(), StorageError> {
        let result = async {
            // An object without parts gets an empty one from object_store's S3 client.
            if self.buffer.content_length() > 0 {
                self.send_part().await?;
            }
            self.wait_for_parts(0).await?;
            self.upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|err| StorageError::from_object_store(&self.key, err))
        }
        .await;
        if result.is_err() {
            self.discard().await;
        }
        result
    }

    /// Aborts the upload: uploaded parts are discarded and nothing becomes visible.
    pub async fn abort(mut self) -> Result<(), StorageError> {
        self.parts.shutdown().await;
        self.upload
            .abort()
            .await
            .map_err(|err| StorageError::from_object_store(&self.key, err))
    }

    /// Starts uploading the gathered bytes as the next part, once fewer than
    /// `parts_in_flight` are uploading.
    async fn send_part(&mut self) -> Result<(), StorageError> {
        if self.max_parts.is_some_and(|most| self.parts_sent >= most) {
            let fits: usize = (0..self.parts_sent)
                .map(|index| part_size_at(self.base_part_size, index, self.grow_after))
                .sum();
            return Err(StorageError::Config(format!(
                "`{}` is larger than a multipart upload of {} parts holds ({} MiB with \
                 storage.part_size_mib = {}): raise part_size_mib",
                self.key,
                self.parts_sent,
                fits >> 20,
                self.base_part_size >> 20
            )));
        }
        self.wait_for_parts(self.parts_in_flight.saturating_sub(1))
            .await?;
        self.parts_sent += 1;
        let part = PutPayload::from(std::mem::take(&mut self.buffer));
        self.parts.spawn(self.upload.put_part(part));
        Ok(())
    }

    /// Waits until at most `most` parts are uploading; the first failed part is the error.
    async fn wait_for_parts(&mut self, most: usize) -> Result<(), StorageError> {
        while self.parts.len() > most {
            match self.parts.join_next().await {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(err))) => return Err(StorageError::from_object_store(&self.key, err)),
                Some(Err(err)) => {
                    return Err(StorageError::Unavailable {
                        key: self.key.clone(),
                        message: format!("a part upload stopped: {err}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Aborts after a failure that is reported on its own; a failed abort is only logged.
    pub async fn discard(self) {
        if let Err(err) = self.abort().await {
            tracing::warn!(
                error = %err,
                "could not abort a multipart upload: the bucket's lifecycle rule (S3) or prune \
                 (local directory) removes it later"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_object_once_in_order() {
        for (size, step) in [(0, 8), (1, 8), (8, 8), (9, 8), (16, 8), (17, 8), (5, 1)] {
            let ranges: Vec<_> = byte_ranges(size, step).collect();
            let mut next = 0;
            for range in &ranges {
                assert_eq!(range.start, next, "{size}/{step}: {ranges:?}");
                assert!(range.end > range.start && range.end - range.start <= step);
                next = range.end;
            }
            assert_eq!(next, size, "{size}/{step}: {ranges:?}");
            assert_eq!(ranges.len() as u64, size.div_ceil(step));
        }
    }

    #[test]
    fn slices_split_bytes_without_losing_any() {
        let bytes = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<_>>());
        for size in [1, 7, 256, 999, 1000, 4096] {
            let slices: Vec<Bytes> = slices_of(bytes.clone(), size).collect();
            assert!(slices.iter().all(|s| !s.is_empty() && s.len() <= size));
            assert_eq!(slices.concat(), bytes.to_vec(), "size {size}");
        }
        assert_eq!(slices_of(Bytes::new(), 8).count(), 0);
    }

    #[test]
    fn parts_keep_the_configured_size_until_huge_and_s3s_limit_holds_half_a_tebibyte() {
        let base = 8 << 20;
        let size = |base, index| part_size_at(base, index, GROW_AFTER);
        assert!((0..GROW_AFTER).all(|index| size(base, index) == base));
        let sizes: Vec<usize> = (0..S3_MAX_PARTS).map(|i| size(base, i)).collect();
        assert!(sizes.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(sizes[S3_MAX_PARTS - 1], base * 32);
        let holds: usize = sizes.iter().sum();
        assert_eq!(holds, base * 67_000, "523 GiB at 8 MiB parts");
        // The smallest part S3 takes (5 MiB) still holds 327 GiB.
        let least: usize = (0..S3_MAX_PARTS).map(|i| size(5 << 20, i)).sum();
        assert!(least > 300 << 30);
    }

    /// Storage in the local directory `dir`.
    fn local(dir: &std::path::Path) -> Storage {
        let env: std::collections::HashMap<String, String> = [
            ("BACKUP_STORAGE_DIR", dir.to_str().unwrap()),
            ("BACKUP_CONFIG_DIR", "/nonexistent"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Storage::open(&crate::config::Settings::storage(&env).unwrap()).unwrap()
    }

    /// The test suite's Garage (scripts/test.sh starts it and sets `BACKUP_TEST_S3_*`).
    fn garage() -> Storage {
        let var = |name: &str| {
            std::env::var(format!("BACKUP_TEST_S3_{name}")).unwrap_or_else(|_| {
                panic!("BACKUP_TEST_S3_{name} is not set: run ./scripts/test.sh")
            })
        };
        let env: std::collections::HashMap<String, String> = [
            ("BACKUP_S3_ENDPOINT", var("ENDPOINT")),
            ("BACKUP_S3_BUCKET", var("BUCKET")),
            ("BACKUP_S3_REGION", var("REGION")),
            ("BACKUP_S3_ACCESS_KEY", var("ACCESS_KEY")),
            ("BACKUP_S3_SECRET_KEY", var("SECRET_KEY")),
            (
                "BACKUP_STORAGE_PREFIX",
                format!("parts-{}", uuid::Uuid::new_v4()),
            ),
            ("BACKUP_CONFIG_DIR", "/nonexistent".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Storage::open(&crate::config::Settings::storage(&env).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn parts_that_grew_complete_on_s3_and_read_back_whole() {
        let storage = garage();
        let mut upload = storage.start_upload("grown.bin").await.unwrap();
        // Growth from the second part on: parts of 5 MiB, 10 MiB and the last 3 MiB.
        upload.base_part_size = 5 << 20;
        upload.grow_after = 1;
        let data: Vec<u8> = (0..18u32 << 20).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(1 << 20) {
            upload.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(upload.parts_sent, 2, "two full parts before the last");
        upload.finish().await.unwrap();
        let stored = storage.get_bytes("grown.bin", u64::MAX).await.unwrap();
        assert!(stored == data, "the object differs from what was written");
        storage.delete("grown.bin").await.unwrap();
    }

    /// What the bucket holds is read back as untrusted: an object larger than its kind may be
    /// is refused before it is read, and an oversized manifest is listed as unreadable.
    #[tokio::test]
    async fn objects_larger_than_they_may_be_are_refused_unread() {
        use crate::model::{BackupId, TargetKind};
        use crate::storage::catalog::{self, CatalogError};
        let dir = tempfile::tempdir().unwrap();
        let storage = local(dir.path());
        storage
            .put_bytes("small.json", Bytes::from(vec![b'x'; 2048]))
            .await
            .unwrap();
        assert_eq!(
            storage.get_bytes("small.json", 2048).await.unwrap().len(),
            2048
        );
        let err = storage.get_bytes("small.json", 2047).await.unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::TooLarge {
                    size: 2048,
                    max: 2047,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.retryable());

        // A manifest of 600 MiB (a sparse file: nothing is written, nothing may be read).
        let id = BackupId::generate(TargetKind::Postgres, chrono::Utc::now());
        let manifest = dir.path().join(layout::manifest_key(&id));
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::File::create(&manifest)
            .unwrap()
            .set_len(600 << 20)
            .unwrap();
        let listing = catalog::list(&storage, TargetKind::Postgres).await.unwrap();
        assert!(listing.manifests.is_empty());
        assert_eq!(listing.unreadable.len(), 1, "{:?}", listing.unreadable);
        assert!(
            listing.unreadable[0].1.contains("more than the"),
            "{:?}",
            listing.unreadable
        );
        let err = catalog::get(&storage, &id).await.unwrap_err();
        assert!(matches!(err, CatalogError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn local_parts_never_grow_however_many_there_are() {
        let dir = tempfile::tempdir().unwrap();
        let storage = local(dir.path());
        let mut upload = storage
            .start_upload("documents/x/big.tar.zst")
            .await
            .unwrap();
        upload.base_part_size = 1024;
        let parts = GROW_AFTER + 100;
        upload
            .write(Bytes::from(vec![7u8; parts * 1024]))
            .await
            .unwrap();
        // Grown parts (2 KiB past GROW_AFTER) would have made fewer.
        assert_eq!(upload.parts_sent, parts);
        upload.finish().await.unwrap();
        assert_eq!(
            storage
                .get_bytes("documents/x/big.tar.zst", u64::MAX)
                .await
                .unwrap()
                .len(),
            parts * 1024
        );
    }

    #[tokio::test]
    async fn an_upload_past_the_part_limit_fails_naming_the_setting_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = local(dir.path());
        let mut upload = storage
            .start_upload("postgres/x/big.dump.zst")
            .await
            .unwrap();
        // As S3 would be with 1 KiB parts and a limit of three.
        upload.base_part_size = 1024;
        upload.max_parts = Some(3);
        upload
            .write(Bytes::from(vec![7u8; 3 * 1024]))
            .await
            .unwrap();
        let err = upload
            .write(Bytes::from(vec![7u8; 2 * 1024]))
            .await
            .unwrap_err();
        assert!(!err.retryable());
        let message = err.to_string();
        assert!(
            message.contains("postgres/x/big.dump.zst") && message.contains("3 parts"),
            "{message}"
        );
        assert!(message.contains("raise part_size_mib"), "{message}");
        upload.discard().await;
        assert!(!storage.exists("postgres/x/big.dump.zst").await.unwrap());
        assert!(storage.list_staging("postgres").await.unwrap().is_empty());
    }
}
