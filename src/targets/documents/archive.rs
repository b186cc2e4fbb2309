//! Writing the document tree as a tar stream, with a per-file index (blocking code).
//!
//! Symlinks are stored as links and never followed; special files are skipped and
//! listed; a file whose size or mtime changes while it is read is stored as read,
//! padded or cut to the size announced in its header, and reported.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pipeline::{BlockingSink, RawDigest};

/// One entry of the index in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub mtime_nanos: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The backup whose tar holds this file's content (itself, or an ancestor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_in: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl IndexEntry {
    /// Same content as far as a backup can tell without reading it.
    pub fn unchanged_since(&self, earlier: &IndexEntry) -> bool {
        self.kind == earlier.kind
            && self.size == earlier.size
            && self.mtime == earlier.mtime
            && self.mtime_nanos == earlier.mtime_nanos
            && self.mode == earlier.mode
            && self.link == earlier.link
    }
}

/// What writing the tree found.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ArchiveReport {
    pub index: Vec<IndexEntry>,
    pub skipped: Vec<Skipped>,
    pub changed_during_backup: Vec<String>,
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// (position in `index`, file number in the sink) of each stored file: its SHA-256
    /// comes from the sink's hashing thread once the stream has ended.
    #[serde(skip)]
    hashed_by_sink: Vec<(usize, usize)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Writes `root` as a tar stream into `out`, to its end. Files whose index entry is
/// unchanged from `previous` are not stored again (incremental); their entry keeps
/// `stored_in`. Returns what was found and the digest of the stream.
pub fn write_tree(
    root: &Path,
    out: BlockingSink,
    previous: &BTreeMap<String, IndexEntry>,
    this_backup: &str,
) -> io::Result<(ArchiveReport, RawDigest)> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut report = ArchiveReport::default();
    walk(root, root, &mut builder, previous, this_backup, &mut report)?;
    let raw = builder.into_inner()?.finish()?;
    fill_hashes(&mut report, &raw)?;
    Ok((report, raw))
}

/// Puts the SHA-256 of each stored file, computed by the sink, into its index entry.
fn fill_hashes(report: &mut ArchiveReport, raw: &RawDigest) -> io::Result<()> {
    for (position, file) in std::mem::take(&mut report.hashed_by_sink) {
        let sha256 = raw
            .file_sha256(file)
            .ok_or_else(|| io::Error::other(format!("the sink did not hash file {file}")))?;
        report.index[position].sha256 = Some(sha256.to_string());
    }
    Ok(())
}

fn walk(
    root: &Path,
    dir: &Path,
    builder: &mut tar::Builder<BlockingSink>,
    previous: &BTreeMap<String, IndexEntry>,
    this_backup: &str,
    report: &mut ArchiveReport,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).expect("below the root");
        let Some(name) = relative.to_str().map(String::from) else {
            report.skipped.push(Skipped {
                path: relative.to_string_lossy().into_owned(),
                reason: "the name is not UTF-8".into(),
            });
            continue;
        };
        let meta = fs::symlink_metadata(&path)?;
        let file_type = meta.file_type();
        let mut index = IndexEntry {
            path: name.clone(),
            kind: EntryKind::File,
            size: 0,
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime(),
            mtime_nanos: meta.mtime_nsec() as u32,
            sha256: None,
            link: None,
            stored_in: None,
        };
        if file_type.is_dir() {
            index.kind = EntryKind::Dir;
            let mut header = header_for(&meta, tar::EntryType::Directory, 0);
            builder.append_data(&mut header, &name, io::empty())?;
            report.index.push(index);
            walk(root, &path, builder, previous, this_backup, report)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path)?;
            if let Err(reason) =
                super::extract::check_link(relative.parent().unwrap_or(Path::new("")), &target)
            {
                // A link out of the tree cannot be restored safely: say so now, not at 3 a.m.
                report.skipped.push(Skipped {
                    path: name,
                    reason: format!("{reason}: not backed up"),
                });
                continue;
            }
            index.kind = EntryKind::Symlink;
            index.link = Some(target.to_string_lossy().into_owned());
            let mut header = header_for(&meta, tar::EntryType::Symlink, 0);
            builder.append_link(&mut header, &name, &target)?;
            report.index.push(index);
        } else if file_type.is_file() {
            index.size = meta.len();
            match previous.get(&name) {
                Some(earlier) if index.unchanged_since(earlier) => {
                    index.sha256 = earlier.sha256.clone();
                    index.stored_in = earlier.stored_in.clone();
                }
                _ => {
                    if let Some(file) = store_file(&path, &meta, &name, builder, report)? {
                        report.hashed_by_sink.push((report.index.len(), file));
                    }
                    index.stored_in = Some(this_backup.to_string());
                }
            }
            report.index.push(index);
        } else {
            let kind = if file_type.is_fifo() {
                "a FIFO"
            } else if file_type.is_socket() {
                "a socket"
            } else if file_type.is_block_device() || file_type.is_char_device() {
                "a device"
            } else {
                "not a regular file"
            };
            report.skipped.push(Skipped {
                path: name,
                reason: format!("{kind}: not backed up"),
            });
        }
    }
    Ok(())
}

fn header_for(meta: &Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Streams one file into the archive. Returns the sink's number for its content (whose
/// SHA-256 the sink computes), or None when the file was deleted before it could be opened.
fn store_file(
    path: &Path,
    meta: &Metadata,
    name: &str,
    builder: &mut tar::Builder<BlockingSink>,
    report: &mut ArchiveReport,
) -> io::Result<Option<usize>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            report
                .changed_during_backup
                .push(format!("{name} (deleted)"));
            return Ok(None);
        }
        Err(err) => {
            return Err(io::Error::new(
                err.kind(),
                format!("{}: {err}", path.display()),
            ));
        }
    };
    let size = meta.len();
    let mut header = header_for(meta, tar::EntryType::Regular, size);
    // The builder writes the header (and a long-name entry when needed); the content
    // follows straight from the file into the pipeline's chunks: tar's own copy goes
    // through an 8 KiB buffer, a system call and a copy per 8 KiB.
    builder.append_data(&mut header, name, io::empty())?;
    let out = builder.get_mut();
    let number = out.begin_file();
    let mut remaining = size;
    while remaining > 0 {
        let limit = usize::try_from(remaining).unwrap_or(usize::MAX);
        let read = out.read_into(&mut file, limit)?;
        if read == 0 {
            break;
        }
        remaining -= read as u64;
    }
    let short = remaining > 0;
    // A file that shrank while it was read is padded to the size its header announced.
    let zeros = [0u8; BLOCK];
    while remaining > 0 {
        let n = remaining.min(BLOCK as u64) as usize;
        out.write_all(&zeros[..n])?;
        remaining -= n as u64;
    }
    out.end_file();
    out.write_all(&zeros[..padding(size)])?;
    let after = file.metadata()?;
    let changed = short
        || after.len() != size
        || after.mtime() != meta.mtime()
        || after.mtime_nsec() != meta.mtime_nsec();
    if changed {
        report.changed_during_backup.push(name.to_string());
    }
    report.stored_files += 1;
    report.stored_bytes += size;
    Ok(Some(number))
}

/// tar's record size: every entry's content is padded to a multiple of it.
const BLOCK: usize = 512;

/// Zero bytes that follow `size` bytes of content in a tar stream.
fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use sha2::Digest;

    use super::*;

    #[test]
    fn a_file_that_shrinks_while_read_is_padded_to_its_header_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinking.bin");
        let original: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &original).unwrap();
        let before = fs::symlink_metadata(&path).unwrap();
        // Cut while "being read": the header announces the size seen before.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(70_000)
            .unwrap();
        let (sink, mut chunks) = BlockingSink::detached(64 << 10);
        let mut builder = tar::Builder::new(sink);
        let mut report = ArchiveReport::default();
        let file = store_file(&path, &before, "shrinking.bin", &mut builder, &mut report)
            .unwrap()
            .expect("the file exists");
        let raw = builder.into_inner().unwrap().finish().unwrap();
        let mut stream = Vec::new();
        while let Ok(chunk) = chunks.try_recv() {
            stream.extend_from_slice(&chunk);
        }

        let mut expected = original[..70_000].to_vec();
        expected.resize(original.len(), 0);
        let mut archive = tar::Archive::new(stream.as_slice());
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(entry.header().size().unwrap(), original.len() as u64);
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        drop(entry);
        assert!(
            content == expected,
            "content is the shrunk file, zero-padded"
        );
        assert!(entries.next().is_none());
        assert_eq!(
            raw.file_sha256(file),
            Some(hex::encode(sha2::Sha256::digest(&expected)).as_str())
        );
        assert_eq!(report.changed_during_backup, vec!["shrinking.bin"]);
        assert_eq!(stream.len() % BLOCK, 0);
        // The sink hashed the whole stream (header, content, padding) on the way in.
        assert_eq!(raw.bytes(), stream.len() as u64);
        assert_eq!(raw.sha256(), hex::encode(sha2::Sha256::digest(&stream)));
    }

    #[test]
    fn content_is_padded_to_whole_records() {
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 511);
        assert_eq!(padding(512), 0);
        assert_eq!(padding(513), 511);
        assert_eq!(padding(1 << 30), 0);
    }
}
