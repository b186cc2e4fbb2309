//! Writing the document tree as a tar stream, with a per-file index (blocking code).
//!
//! Symlinks are stored as links and never followed; special files are skipped and
//! listed; a file whose size or mtime changes while it is read is stored as read,
//! padded or cut to the size announced in its header, and reported.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Writes `root` as a tar stream into `out`. Files whose index entry is unchanged from
/// `previous` are not stored again (incremental); their entry keeps `stored_in`.
pub fn write_tree<W: Write>(
    root: &Path,
    out: W,
    previous: &BTreeMap<String, IndexEntry>,
    this_backup: &str,
) -> io::Result<(ArchiveReport, W)> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut report = ArchiveReport::default();
    walk(root, root, &mut builder, previous, this_backup, &mut report)?;
    let out = builder.into_inner()?;
    Ok((report, out))
}

fn walk<W: Write>(
    root: &Path,
    dir: &Path,
    builder: &mut tar::Builder<W>,
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
                    store_file(&path, &meta, &name, builder, &mut index, report)?;
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

/// Streams one file into the archive, hashing what is stored.
fn store_file<W: Write>(
    path: &Path,
    meta: &Metadata,
    name: &str,
    builder: &mut tar::Builder<W>,
    index: &mut IndexEntry,
    report: &mut ArchiveReport,
) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            report
                .changed_during_backup
                .push(format!("{name} (deleted)"));
            return Ok(());
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
    let mut reader = ExactReader {
        inner: file,
        remaining: size,
        short: false,
        hasher: Sha256::new(),
    };
    builder.append_data(&mut header, name, &mut reader)?;
    let after = reader.inner.metadata()?;
    let changed = reader.short
        || after.len() != size
        || after.mtime() != meta.mtime()
        || after.mtime_nsec() != meta.mtime_nsec();
    if changed {
        report.changed_during_backup.push(name.to_string());
    }
    index.sha256 = Some(hex::encode(reader.hasher.finalize()));
    report.stored_files += 1;
    report.stored_bytes += size;
    Ok(())
}

/// Yields exactly `remaining` bytes: the file's, then zeros if it shrank.
struct ExactReader {
    inner: File,
    remaining: u64,
    short: bool,
    hasher: Sha256,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.try_into().unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            n = want;
        }
        self.hasher.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}
