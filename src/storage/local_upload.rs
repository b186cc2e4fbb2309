//! Multipart uploads into the local storage directory, durable without a stall at the end.
//!
//! `object_store`'s local uploads write every part into the page cache and make the file
//! durable with one `fsync` when the upload completes. Linux starts writing dirty pages back
//! only once they reach a tenth of memory, so a 1 GiB artifact waits for the whole gigabyte at
//! the end (seconds of a stalled backup), and the burst competes with the database's own I/O.
//! Here the page-aligned stretches of each part (all of an artifact but its last partial
//! page) are written with `O_DIRECT` where the file system allows it (Linux): they go from
//! the pipeline's chunks, which are page-aligned buffers, straight to the disk. A backup then
//! neither evicts the database's cached pages for a gigabyte it will not read again nor pays
//! for copying it into the cache (a large share of a documents backup's CPU time), and the
//! disk takes large direct writes faster than a cache flush at the end. What cannot go direct is
//! written through the cache and handed to the disk at once (`sync_file_range` with
//! `SYNC_FILE_RANGE_WRITE`, as PostgreSQL's `*_flush_after` settings do). Either way the final
//! `fdatasync` finds little left to do.
//!
//! Same conventions as `object_store`: the parts go to a staging file `<object>#<digits>`
//! beside the object (listings skip such names) that is renamed into place on completion,
//! after which the directory entries are made durable too.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::FutureExt;
use object_store::{MultipartUpload, PutPayload, PutResult, UploadPart};

/// Direct writes need their memory, file offset and length aligned to the device's logical
/// block size: a page covers the usual ones (512 and 4096 bytes).
const DIRECT_ALIGN: usize = 4096;

/// An upload of one object into a staging file of the local directory.
#[derive(Debug)]
pub struct LocalUpload {
    file: Option<Arc<Staged>>,
    staging: PathBuf,
    dest: PathBuf,
    /// Directories created for the object: their entries in their parents are synced too.
    new_dirs: Vec<PathBuf>,
    /// Where the next part starts.
    offset: u64,
}

impl LocalUpload {
    /// Creates the staging file for `dest` (and the directories above it).
    pub fn create(dest: PathBuf) -> io::Result<Self> {
        let parent = dest.parent().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "an object path has a parent")
        })?;
        let mut new_dirs = Vec::new();
        create_dirs(parent, &mut new_dirs)?;
        loop {
            let mut staging = dest.clone().into_os_string();
            staging.push(format!("#{}", rand::random::<u64>()));
            let staging = PathBuf::from(staging);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(file) => {
                    let direct = open_direct(&staging);
                    return Ok(LocalUpload {
                        file: Some(Arc::new(Staged {
                            buffered: file,
                            direct,
                            direct_bytes: AtomicU64::new(0),
                        })),
                        staging,
                        dest,
                        new_dirs,
                        offset: 0,
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(with_path(err, &staging)),
            }
        }
    }

    fn file(&self) -> object_store::Result<Arc<Staged>> {
        self.file
            .clone()
            .ok_or_else(|| object_store::Error::Generic {
                store: "local",
                source: format!("the upload of {} has ended", self.dest.display()).into(),
            })
    }
}

#[async_trait]
impl MultipartUpload for LocalUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let start = self.offset;
        self.offset += data.content_length() as u64;
        let file = self.file();
        let staging = self.staging.clone();
        async move {
            let file = file?;
            blocking(move || {
                let mut at = start;
                for bytes in data.iter() {
                    file.write_all_at(bytes, at)
                        .map_err(|err| with_path(err, &staging))?;
                    at += bytes.len() as u64;
                }
                Ok(())
            })
            .await
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let file = self.file()?;
        self.file = None;
        let (staging, dest) = (self.staging.clone(), self.dest.clone());
        let new_dirs = std::mem::take(&mut self.new_dirs);
        blocking(move || {
            file.buffered
                .sync_data()
                .map_err(|err| with_path(err, &staging))?;
            tracing::debug!(
                file = %dest.display(),
                direct_bytes = file.direct_bytes.load(Ordering::Relaxed),
                "artifact written"
            );
            drop(file);
            fs::rename(&staging, &dest).map_err(|err| with_path(err, &dest))?;
            // The new name, then each new directory's entry, deepest first.
            for dir in dest
                .parent()
                .into_iter()
                .chain(new_dirs.iter().rev().filter_map(|d| d.parent()))
            {
                sync_dir(dir)?;
            }
            Ok(())
        })
        .await?;
        Ok(PutResult {
            e_tag: None,
            version: None,
            extensions: Default::default(),
        })
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.file = None;
        let staging = self.staging.clone();
        blocking(move || match fs::remove_file(&staging) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(with_path(err, &staging)),
        })
        .await
    }
}

/// An upload dropped before it completed or was aborted (its step was cancelled: the
/// broker went away, or the shutdown timeout passed) takes its staging file with it.
impl Drop for LocalUpload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.staging);
        }
    }
}

/// The staging file, open twice: through the page cache, and with `O_DIRECT` where the
/// file system allows it.
#[derive(Debug)]
struct Staged {
    buffered: File,
    direct: Option<File>,
    /// Bytes that went to the disk directly.
    direct_bytes: AtomicU64,
}

impl Staged {
    /// Writes all of `data` at `offset`: its page-aligned stretch directly, the rest (and
    /// everything, where direct writes are refused) through the page cache.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        if let Some(direct) = &self.direct {
            while done < data.len() {
                let at = offset + done as u64;
                let whole = direct_len(&data[done..], at);
                if whole == 0 {
                    break;
                }
                match direct.write_at(&data[done..done + whole], at) {
                    Ok(0) => break,
                    Ok(n) => {
                        done += n;
                        self.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    // This device wants another alignment: the page cache takes the rest.
                    Err(err) if err.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(err) => return Err(err),
                }
            }
        }
        let (rest, at) = (&data[done..], offset + done as u64);
        if !rest.is_empty() {
            self.buffered.write_all_at(rest, at)?;
            start_writeback(&self.buffered, at, rest.len() as u64);
        }
        Ok(())
    }
}

/// How many leading bytes of `data`, written at `offset`, a direct write can take: whole
/// pages, from a page-aligned address to a page-aligned offset; else none.
fn direct_len(data: &[u8], offset: u64) -> usize {
    if !(data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        || !offset.is_multiple_of(DIRECT_ALIGN as u64)
    {
        return 0;
    }
    data.len() / DIRECT_ALIGN * DIRECT_ALIGN
}

/// A second, `O_DIRECT` descriptor of `path`; none where the file system refuses it (tmpfs).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// A staging file found under a directory.
pub struct StagingFile {
    /// Path below the directory searched, `/`-separated.
    pub relative: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Every staging file (`<name>#<digits>`) below `root`; none if `root` does not exist.
pub fn staging_files(root: &Path) -> io::Result<Vec<StagingFile>> {
    let mut found = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, relative)) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(with_path(err, &dir)),
        };
        for entry in entries {
            let entry = entry.map_err(|err| with_path(err, &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if relative.is_empty() {
                name.clone()
            } else {
                format!("{relative}/{name}")
            };
            let meta = entry
                .metadata()
                .map_err(|err| with_path(err, &entry.path()))?;
            if meta.is_dir() {
                dirs.push((entry.path(), path));
            } else if is_staging_name(&name) {
                found.push(StagingFile {
                    relative: path,
                    size: meta.len(),
                    modified: meta
                        .modified()
                        .map_err(|err| with_path(err, &entry.path()))?
                        .into(),
                });
            }
        }
    }
    Ok(found)
}

/// `<name>#<digits>`: how both this module and `object_store` name staging files.
fn is_staging_name(name: &str) -> bool {
    matches!(name.rsplit_once('#'), Some((_, digits)) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Asks the kernel to start writing a just-written range to disk, without waiting for it.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor; it only schedules writeback.
    // Its failure costs nothing but the early start: the final fdatasync still runs.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// `create_dir_all` that lists the directories it created, outermost first.
fn create_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent, created)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            created.push(dir.to_path_buf());
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(with_path(err, dir)),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| with_path(err, dir))
}

fn with_path(err: io::Error, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// Runs file-system work on the blocking pool; a task that panicked is an I/O error too.
pub(super) async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| io::Error::other(err.to_string()))
        .and_then(|done| done)
}

/// [`run_blocking`] for the `MultipartUpload` methods, with `object_store`'s error type.
async fn blocking(
    work: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> object_store::Result<()> {
    run_blocking(work)
        .await
        .map_err(|err| object_store::Error::Generic {
            store: "local",
            source: Box::new(err),
        })
}

#[cfg(test)]
mod tests {
    use object_store::WriteMultipart;

    use super::*;

    fn staging_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains('#'))
            .collect()
    }

    #[tokio::test]
    async fn parts_land_in_order_and_appear_only_on_completion() {
        let root = tempfile::tempdir().unwrap();
        let dest = root
            .path()
            .join("postgres/20261126T000000Z-postgres-abcd/crm.dump.zst");
        let upload = LocalUpload::create(dest.clone()).unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(Box::new(upload), 1000);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        for piece in data.chunks(777) {
            writer.wait_for_capacity(3).await.unwrap();
            writer.put(bytes::Bytes::copy_from_slice(piece));
        }
        assert!(!dest.exists(), "nothing is visible before completion");
        writer.finish().await.unwrap();
        assert_eq!(fs::read(&dest).unwrap(), data);
        assert!(staging_files(dest.parent().unwrap()).is_empty());
    }

    /// `len` bytes starting on a page boundary of `backing`.
    fn page_aligned(backing: &mut Vec<u8>, len: usize) -> &mut [u8] {
        backing.resize(len + DIRECT_ALIGN, 0);
        let start = backing.as_ptr().align_offset(DIRECT_ALIGN);
        &mut backing[start..start + len]
    }

    #[test]
    fn only_whole_pages_from_a_page_aligned_address_to_a_page_aligned_offset_go_direct() {
        let mut backing = Vec::new();
        let data = page_aligned(&mut backing, 3 * DIRECT_ALIGN + 100);
        assert_eq!(direct_len(data, 0), 3 * DIRECT_ALIGN);
        assert_eq!(direct_len(data, 5 * DIRECT_ALIGN as u64), 3 * DIRECT_ALIGN);
        assert_eq!(direct_len(&data[..DIRECT_ALIGN - 1], 0), 0);
        assert_eq!(direct_len(data, 512), 0, "offset off a page");
        assert_eq!(direct_len(&data[1..], 0), 0, "address off a page");
    }

    #[test]
    fn a_file_written_in_direct_and_cached_stretches_holds_every_byte_in_place() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("documents/x/documents.tar.zst");
        let upload = LocalUpload::create(dest.clone()).unwrap();
        let staged = upload.file().unwrap();
        let probe = root.path().join("probe");
        fs::write(&probe, b"").unwrap();
        assert_eq!(
            staged.direct.is_some(),
            cfg!(target_os = "linux") && open_direct(&probe).is_some(),
            "the upload writes directly wherever this file system allows it"
        );
        let mut backing = Vec::new();
        let aligned = page_aligned(&mut backing, 4 * DIRECT_ALIGN + 300);
        for (i, byte) in aligned.iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let unaligned: Vec<u8> = (0..5000u32).map(|i| (i % 13) as u8).collect();
        // Pieces in the order parts may finish: a later part first, then an earlier one.
        let tail_at = (2 * DIRECT_ALIGN + aligned.len()) as u64;
        staged.write_all_at(&unaligned, tail_at).unwrap();
        staged
            .write_all_at(&aligned[..2 * DIRECT_ALIGN], 0)
            .unwrap();
        staged
            .write_all_at(aligned, 2 * DIRECT_ALIGN as u64)
            .unwrap();
        staged.buffered.sync_data().unwrap();

        if staged.direct.is_some() {
            let direct = staged.direct_bytes.load(Ordering::Relaxed);
            assert_eq!(
                direct,
                6 * DIRECT_ALIGN as u64,
                "whole aligned pages go direct"
            );
        }
        let mut expected = aligned[..2 * DIRECT_ALIGN].to_vec();
        expected.extend_from_slice(aligned);
        expected.extend_from_slice(&unaligned);
        assert_eq!(fs::read(&upload.staging).unwrap(), expected);
    }

    #[tokio::test]
    async fn an_upload_dropped_unfinished_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("postgres/x/crm.dump.zst");
        let upload = LocalUpload::create(dest.clone()).unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(Box::new(upload), 10);
        writer.put(bytes::Bytes::from_static(
            b"the first part of a step that is cancelled",
        ));
        writer.wait_for_capacity(0).await.unwrap();
        assert_eq!(staging_files(dest.parent().unwrap()).len(), 1);
        drop(writer);
        assert!(!dest.exists());
        assert!(staging_files(dest.parent().unwrap()).is_empty());
    }

    #[tokio::test]
    async fn abort_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("redis/x/dump.rdb.zst");
        let upload = LocalUpload::create(dest.clone()).unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(Box::new(upload), 10);
        writer.put(bytes::Bytes::from_static(
            b"some bytes that will not be kept",
        ));
        writer.abort().await.unwrap();
        assert!(!dest.exists());
        assert!(staging_files(dest.parent().unwrap()).is_empty());
    }
}
