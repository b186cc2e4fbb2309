//! The document tree as a tar stream that the backup pipeline reads ([`TarStream`], a
//! blocking `Read`), with a per-file index (path, size, mode, mtime, SHA-256).
//!
//! The tree is walked as the stream is read, one directory listing at a time; a file's
//! content is read straight into the pipeline's buffer, with no copy in between. Each stored
//! file's SHA-256 is computed from the stream by the pipeline's hashing thread
//! (`super::digests`); [`ArchiveReport::stored`] says which index entries they belong to.
//! Symlinks are stored as links and never followed; special files are skipped and listed; a
//! file whose size or mtime changes while it is read is stored as read, padded or cut to the
//! size announced in its header, and reported.
//!
//! The walk cannot be redirected: every directory and file is opened relative to its parent
//! directory's descriptor with `O_NOFOLLOW`, and what is stored is what `fstat` says of the
//! open descriptor. A file swapped for a symlink (or anything else) between the listing and
//! the open is reported as changed, never followed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use serde::{Deserialize, Serialize};

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

/// What reading the tree found.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ArchiveReport {
    pub index: Vec<IndexEntry>,
    pub skipped: Vec<Skipped>,
    pub changed_during_backup: Vec<String>,
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// The index positions of the files stored in the stream, in stream order.
    #[serde(skip)]
    pub stored: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

impl ArchiveReport {
    /// Puts the digests of the stored files, in stream order, into their index entries.
    pub fn fill_digests(&mut self, digests: Vec<String>) -> Result<(), String> {
        if digests.len() != self.stored.len() {
            return Err(format!(
                "{} files were stored and {} hashed",
                self.stored.len(),
                digests.len()
            ));
        }
        for (&position, digest) in self.stored.iter().zip(digests) {
            self.index[position].sha256 = Some(digest);
        }
        Ok(())
    }
}

/// The tree under a root as a tar stream: see the module documentation. Files whose index
/// entry is unchanged from `previous` are not stored again (incremental); their entry keeps
/// its `stored_in`.
pub struct TarStream {
    root: PathBuf,
    previous: BTreeMap<String, IndexEntry>,
    this_backup: String,
    report: ArchiveReport,
    /// Directories being listed, deepest last: the entries of each still to visit.
    pending: Vec<Listing>,
    /// Serialises headers (GNU long names included) into its vector, which `out` drains.
    headers: tar::Builder<Vec<u8>>,
    /// Bytes to hand out before anything else: headers, padding, the end of the archive.
    out: Vec<u8>,
    out_at: usize,
    file: Option<OpenFile>,
    listed_root: bool,
    ended: bool,
}

/// A directory being walked: its descriptor, its path in the tree, the names left.
struct Listing {
    dir: OwnedFd,
    path: String,
    names: std::vec::IntoIter<OsString>,
}

/// What the stream records of an entry, from `fstat` of its open descriptor (or `lstat`
/// relative to its directory, for links).
#[derive(Clone, Copy)]
struct Attrs {
    kind: FileType,
    size: u64,
    mode: u32,
    mtime: i64,
    mtime_nanos: u32,
}

impl From<&Stat> for Attrs {
    fn from(stat: &Stat) -> Self {
        Attrs {
            kind: FileType::from_raw_mode(stat.st_mode),
            size: stat.st_size.max(0) as u64,
            mode: stat.st_mode & 0o7777,
            mtime: stat.st_mtime,
            mtime_nanos: stat.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        }
    }
}

/// The regular file whose content is being read.
struct OpenFile {
    file: File,
    attrs: Attrs,
    /// Its entry in the index.
    position: usize,
    remaining: u64,
    /// It ended before its announced size: the rest is zeros.
    short: bool,
}

/// tar's record size: every entry's content is padded to a multiple of it.
const BLOCK: usize = 512;

impl TarStream {
    pub fn new(root: &Path, previous: BTreeMap<String, IndexEntry>, this_backup: &str) -> Self {
        let mut headers = tar::Builder::new(Vec::new());
        headers.mode(tar::HeaderMode::Complete);
        headers.follow_symlinks(false);
        TarStream {
            root: root.to_path_buf(),
            previous,
            this_backup: this_backup.to_string(),
            report: ArchiveReport::default(),
            pending: Vec::new(),
            headers,
            out: Vec::new(),
            out_at: 0,
            file: None,
            listed_root: false,
            ended: false,
        }
    }

    /// What the walk found; the stream must have been read to its end.
    pub fn into_report(self) -> ArchiveReport {
        self.report
    }

    /// Puts the next entry's header (and opens its file) into the stream; at the end of the
    /// tree, the end-of-archive records.
    fn next_entry(&mut self) -> io::Result<()> {
        if !self.listed_root {
            self.listed_root = true;
            let root = rustix::fs::open(
                &self.root,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", self.root.display())))?;
            self.list(root, String::new())?;
        }
        loop {
            let Some(listing) = self.pending.last_mut() else {
                self.headers.finish()?;
                self.take_headers();
                self.ended = true;
                return Ok(());
            };
            match listing.names.next() {
                Some(name) => {
                    let parent = listing.path.clone();
                    return self.add(&parent, name);
                }
                None => {
                    self.pending.pop();
                }
            }
        }
    }

    /// Queues the entries of the open directory `dir` (at `path` in the tree), in name order.
    fn list(&mut self, dir: OwnedFd, path: String) -> io::Result<()> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir)? {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name));
            }
        }
        names.sort();
        self.pending.push(Listing {
            dir,
            path,
            names: names.into_iter(),
        });
        Ok(())
    }

    /// The directory being listed (the parent of the entry being added).
    fn parent_dir(&self) -> &OwnedFd {
        &self
            .pending
            .last()
            .expect("an entry comes from a listing")
            .dir
    }

    fn add(&mut self, parent: &str, name: OsString) -> io::Result<()> {
        let relative = Path::new(parent).join(&name);
        let Some(path) = relative.to_str().map(String::from) else {
            self.report.skipped.push(Skipped {
                path: relative.to_string_lossy().into_owned(),
                reason: "the name is not UTF-8".into(),
            });
            return Ok(());
        };
        let stat = match rustix::fs::statat(self.parent_dir(), &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => {
                self.report
                    .changed_during_backup
                    .push(format!("{path} (deleted)"));
                return Ok(());
            }
            Err(err) => return Err(io::Error::new(err.kind(), format!("{path}: {err}"))),
        };
        let attrs = Attrs::from(&stat);
        let mut index = IndexEntry {
            path: path.clone(),
            kind: EntryKind::File,
            size: 0,
            mode: attrs.mode,
            mtime: attrs.mtime,
            mtime_nanos: attrs.mtime_nanos,
            sha256: None,
            link: None,
            stored_in: None,
        };
        match attrs.kind {
            FileType::Directory => {
                let Some(dir) = self.open_at(&name, &path, OFlags::DIRECTORY)? else {
                    return Ok(());
                };
                let attrs = Attrs::from(&rustix::fs::fstat(&dir)?);
                index.kind = EntryKind::Dir;
                index.mode = attrs.mode;
                index.mtime = attrs.mtime;
                index.mtime_nanos = attrs.mtime_nanos;
                let mut header = header_for(&attrs, tar::EntryType::Directory, 0);
                self.headers.append_data(&mut header, &path, io::empty())?;
                self.report.index.push(index);
                self.list(dir, path)?;
            }
            FileType::Symlink => {
                let target = match rustix::fs::readlinkat(self.parent_dir(), &name, Vec::new()) {
                    Ok(target) => PathBuf::from(OsString::from_vec(target.into_bytes())),
                    // No longer a link (or gone) since it was listed.
                    Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {
                        self.report.changed_during_backup.push(format!(
                            "{path} (replaced while the backup ran: not backed up)"
                        ));
                        return Ok(());
                    }
                    Err(err) => return Err(io::Error::new(err.kind(), format!("{path}: {err}"))),
                };
                if let Err(reason) = super::extract::check_link(Path::new(parent), &target) {
                    // A link out of the tree cannot be restored safely: say so now, not at 3 a.m.
                    self.report.skipped.push(Skipped {
                        path,
                        reason: format!("{reason}: not backed up"),
                    });
                    return Ok(());
                }
                index.kind = EntryKind::Symlink;
                index.link = Some(target.to_string_lossy().into_owned());
                let mut header = header_for(&attrs, tar::EntryType::Symlink, 0);
                self.headers.append_link(&mut header, &path, &target)?;
                self.report.index.push(index);
            }
            FileType::RegularFile => {
                index.size = attrs.size;
                match self.previous.get(&path) {
                    Some(earlier) if index.unchanged_since(earlier) => {
                        index.sha256 = earlier.sha256.clone();
                        index.stored_in = earlier.stored_in.clone();
                        self.report.index.push(index);
                    }
                    _ => self.open(&name, index)?,
                }
            }
            other => {
                let kind = match other {
                    FileType::Fifo => "a FIFO",
                    FileType::Socket => "a socket",
                    FileType::BlockDevice | FileType::CharacterDevice => "a device",
                    _ => "not a regular file",
                };
                self.report.skipped.push(Skipped {
                    path,
                    reason: format!("{kind}: not backed up"),
                });
            }
        }
        self.take_headers();
        Ok(())
    }

    /// Opens `name` in the directory being listed, never following a symlink; None (and
    /// reported) when it vanished or was replaced by a link since it was listed.
    fn open_at(
        &mut self,
        name: &OsString,
        path: &str,
        kind: OFlags,
    ) -> io::Result<Option<OwnedFd>> {
        // NONBLOCK: something swapped in for a FIFO must not block the open.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | kind;
        match rustix::fs::openat(self.parent_dir(), name, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) => {
                self.report
                    .changed_during_backup
                    .push(format!("{path} (deleted)"));
                Ok(None)
            }
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                self.report.changed_during_backup.push(format!(
                    "{path} (replaced while the backup ran: not followed)"
                ));
                Ok(None)
            }
            Err(err) => Err(io::Error::new(err.kind(), format!("{path}: {err}"))),
        }
    }

    /// Starts storing a file: its header now, its content as the stream is read. What is
    /// stored is what the open descriptor is, whatever the name pointed to when listed.
    fn open(&mut self, name: &OsString, mut index: IndexEntry) -> io::Result<()> {
        let Some(fd) = self.open_at(name, &index.path.clone(), OFlags::empty())? else {
            return Ok(());
        };
        let attrs = Attrs::from(&rustix::fs::fstat(&fd)?);
        if attrs.kind != FileType::RegularFile {
            self.report.changed_during_backup.push(format!(
                "{} (no longer a regular file: not backed up)",
                index.path
            ));
            return Ok(());
        }
        index.size = attrs.size;
        index.mode = attrs.mode;
        index.mtime = attrs.mtime;
        index.mtime_nanos = attrs.mtime_nanos;
        let mut header = header_for(&attrs, tar::EntryType::Regular, attrs.size);
        // The builder writes the header (and a long-name entry when needed); the content
        // follows from the file itself.
        self.headers
            .append_data(&mut header, &index.path, io::empty())?;
        index.stored_in = Some(self.this_backup.clone());
        self.report.index.push(index);
        self.report.stored.push(self.report.index.len() - 1);
        self.file = Some(OpenFile {
            file: File::from(fd),
            remaining: attrs.size,
            attrs,
            position: self.report.index.len() - 1,
            short: false,
        });
        Ok(())
    }

    /// Reads the open file's content into `buf`: what it holds, or zeros once it has shrunk.
    fn read_file(file: &mut OpenFile, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(file.remaining).unwrap_or(usize::MAX));
        let buf = &mut buf[..want];
        let n = if file.short {
            buf.fill(0);
            want
        } else {
            match file.file.read(buf) {
                Ok(0) => {
                    // Shrunk while read: padded to the size its header announced.
                    file.short = true;
                    return Ok(0);
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(0),
                Err(err) => return Err(err),
            }
        };
        file.remaining -= n as u64;
        Ok(n)
    }

    /// The open file is read whole: its padding goes into the stream.
    fn close_file(&mut self, file: OpenFile) -> io::Result<()> {
        let size = file.attrs.size;
        let after = file.file.metadata()?;
        let entry = &self.report.index[file.position];
        let changed = file.short
            || after.len() != size
            || after.mtime() != file.attrs.mtime
            || after.mtime_nsec() != i64::from(file.attrs.mtime_nanos);
        if changed {
            self.report.changed_during_backup.push(entry.path.clone());
        }
        self.report.stored_files += 1;
        self.report.stored_bytes += size;
        self.out.resize(self.out.len() + padding(size), 0);
        Ok(())
    }

    /// Moves what the header builder wrote into the stream.
    fn take_headers(&mut self) {
        self.out.append(self.headers.get_mut());
    }
}

impl Read for TarStream {
    /// Fills `buf` whole unless the stream ends: the pipeline reads it in full chunks.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.out_at < self.out.len() {
                let n = (self.out.len() - self.out_at).min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&self.out[self.out_at..self.out_at + n]);
                self.out_at += n;
                filled += n;
                if self.out_at == self.out.len() {
                    self.out.clear();
                    self.out_at = 0;
                }
                continue;
            }
            if let Some(file) = &mut self.file {
                if file.remaining > 0 {
                    filled += Self::read_file(file, &mut buf[filled..])?;
                    continue;
                }
                if let Some(file) = self.file.take() {
                    self.close_file(file)?;
                }
                continue;
            }
            if self.ended {
                break;
            }
            self.next_entry()?;
        }
        Ok(filled)
    }
}

fn header_for(attrs: &Attrs, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(attrs.mode);
    header.set_mtime(attrs.mtime.max(0) as u64);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Zero bytes that follow `size` bytes of content in a tar stream.
fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

#[cfg(test)]
mod tests {
    use std::fs;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::pipeline::Inspect;
    use crate::targets::documents::digests::FileDigests;

    /// The stream read whole, and its report with the files' digests as the pipeline's
    /// hashing thread computes them.
    fn archive(mut stream: TarStream, piece: usize) -> (Vec<u8>, ArchiveReport) {
        let tar = read_all(&mut stream, piece);
        let mut digests = FileDigests::default();
        digests.inspect(&tar);
        let mut report = stream.into_report();
        report.fill_digests(digests.finish().unwrap()).unwrap();
        (tar, report)
    }

    fn read_all(stream: &mut TarStream, piece: usize) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = vec![0u8; piece];
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return all;
            }
            assert!(n == piece || stream.ended, "a short read before the end");
            all.extend_from_slice(&buf[..n]);
        }
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn the_stream_is_a_tar_of_the_tree_and_the_index_hashes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/deep")).unwrap();
        let long_name = format!("a/{}", "n".repeat(150));
        let files: Vec<(String, Vec<u8>)> = vec![
            ("a/deep/empty".into(), Vec::new()),
            ("a/one".into(), b"one".to_vec()),
            (
                long_name.clone(),
                (0..70_000u32).map(|i| (i % 251) as u8).collect(),
            ),
            ("z".into(), vec![7; 512]),
        ];
        for (path, content) in &files {
            fs::write(root.join(path), content).unwrap();
        }
        std::os::unix::fs::symlink("one", root.join("a/link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape")).unwrap();
        for piece in [1000, 4096, 1 << 20] {
            let (tar, report) = archive(TarStream::new(root, BTreeMap::new(), "b1"), piece);
            assert_eq!(tar.len() % BLOCK, 0);
            let mut archive = tar::Archive::new(tar.as_slice());
            let mut found = BTreeMap::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let mut content = Vec::new();
                entry.read_to_end(&mut content).unwrap();
                found.insert(path, (entry.header().entry_type(), content));
            }
            for (path, content) in &files {
                assert_eq!(&found[path].1, content, "{path}");
                let entry = report.index.iter().find(|e| &e.path == path).unwrap();
                assert_eq!(entry.sha256.as_deref(), Some(sha(content).as_str()));
                assert_eq!(entry.stored_in.as_deref(), Some("b1"));
            }
            assert_eq!(found["a/link"].0, tar::EntryType::Symlink);
            assert!(!found.contains_key("escape"));
            assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
            let paths: Vec<&str> = report.index.iter().map(|e| e.path.as_str()).collect();
            let mut sorted = paths.clone();
            sorted.sort();
            assert_eq!(paths, sorted, "the index is in walk (name) order");
            assert_eq!(report.stored_files, 4);
        }
    }

    #[test]
    fn an_empty_tree_is_an_empty_archive() {
        let dir = tempfile::tempdir().unwrap();
        let mut stream = TarStream::new(dir.path(), BTreeMap::new(), "b1");
        let tar = read_all(&mut stream, 4096);
        assert_eq!(tar, vec![0; 2 * BLOCK]);
        assert!(stream.into_report().index.is_empty());
    }

    #[test]
    fn unchanged_files_of_the_previous_backup_are_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("same"), b"same").unwrap();
        fs::write(dir.path().join("new"), b"new").unwrap();
        let (_, first) = archive(TarStream::new(dir.path(), BTreeMap::new(), "b1"), 4096);
        let previous: BTreeMap<String, IndexEntry> = first
            .index
            .into_iter()
            .filter(|e| e.path == "same")
            .map(|e| (e.path.clone(), e))
            .collect();
        let (tar, report) = archive(TarStream::new(dir.path(), previous, "b2"), 4096);
        let stored_in: Vec<_> = report
            .index
            .iter()
            .map(|e| e.stored_in.clone().unwrap())
            .collect();
        assert_eq!(stored_in, ["b2", "b1"]);
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["new"]);
        assert_eq!(
            report.index[1].sha256.as_deref(),
            Some(sha(b"same").as_str())
        );
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_padded_to_its_header_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinking.bin");
        let original: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &original).unwrap();
        let mut stream = TarStream::new(dir.path(), BTreeMap::new(), "b1");
        // The header is written with the size seen before; then the file is cut.
        let mut first = vec![0u8; 1024];
        assert_eq!(stream.read(&mut first).unwrap(), 1024);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(70_000)
            .unwrap();
        let mut tar = first;
        tar.extend(read_all(&mut stream, 4096));
        let mut digests = FileDigests::default();
        digests.inspect(&tar);
        let mut report = stream.into_report();
        report.fill_digests(digests.finish().unwrap()).unwrap();

        let mut expected = original[..70_000].to_vec();
        expected.resize(original.len(), 0);
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.header().size().unwrap(), original.len() as u64);
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        assert!(
            content == expected,
            "content is the shrunk file, zero-padded"
        );
        assert_eq!(
            report.index[0].sha256.as_deref(),
            Some(sha(&expected).as_str())
        );
        assert_eq!(report.changed_during_backup, vec!["shrinking.bin"]);
    }

    /// A walk that has listed `root` and stat'ed `name` as a regular file (or directory),
    /// about to open it.
    fn listed(root: &Path) -> TarStream {
        let mut stream = TarStream::new(root, BTreeMap::new(), "b1");
        let dir =
            rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        stream.list(dir, String::new()).unwrap();
        stream
    }

    fn regular(path: &str, size: u64) -> IndexEntry {
        IndexEntry {
            path: path.into(),
            kind: EntryKind::File,
            size,
            mode: 0o644,
            mtime: 0,
            mtime_nanos: 0,
            sha256: None,
            link: None,
            stored_in: None,
        }
    }

    #[test]
    fn a_file_swapped_for_a_symlink_after_its_stat_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("documents");
        fs::create_dir(&root).unwrap();
        fs::write(dir.path().join("secret"), b"SECRET").unwrap();
        fs::write(root.join("a.txt"), b"an ordinary document").unwrap();
        let mut stream = listed(&root);
        // Seen as a regular file; then, before the open, the name points at the secret.
        fs::remove_file(root.join("a.txt")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("a.txt")).unwrap();
        stream.open(&"a.txt".into(), regular("a.txt", 20)).unwrap();

        assert!(stream.file.is_none(), "nothing is read");
        let report = stream.into_report();
        assert!(report.stored.is_empty() && report.index.is_empty());
        assert_eq!(
            report.changed_during_backup,
            vec!["a.txt (replaced while the backup ran: not followed)"]
        );
    }

    #[test]
    fn a_file_swapped_for_a_fifo_after_its_stat_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.txt"), b"an ordinary document").unwrap();
        let mut stream = listed(dir.path());
        fs::remove_file(dir.path().join("a.txt")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("a.txt"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        // Opening a FIFO without a writer would block the walk forever.
        stream.open(&"a.txt".into(), regular("a.txt", 20)).unwrap();

        assert!(stream.file.is_none());
        assert_eq!(
            stream.into_report().changed_during_backup,
            vec!["a.txt (no longer a regular file: not backed up)"]
        );
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_its_stat_is_not_entered() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("documents");
        fs::create_dir_all(root.join("sub")).unwrap();
        let mut stream = listed(&root);
        fs::remove_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("sub")).unwrap();

        let opened = stream
            .open_at(&"sub".into(), "sub", OFlags::DIRECTORY)
            .unwrap();
        assert!(opened.is_none(), "/etc is not walked");
        assert_eq!(
            stream.into_report().changed_during_backup,
            vec!["sub (replaced while the backup ran: not followed)"]
        );
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
