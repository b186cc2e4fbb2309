//! Unpacking a tar stream safely into a destination directory (blocking code).
//!
//! Every entry is checked before anything is written: relative paths only, no `..`, no
//! links that leave the destination, no devices, FIFOs or hard links, no ownership
//! changes. Parents must be real directories (never symlinks), and files are created
//! with O_EXCL, so nothing is ever written through a link or outside the destination.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::archive::EntryKind;

/// Why an archive was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("archive entry `{path}` refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("unpacking `{path}`: {source}")]
    Io { path: String, source: io::Error },
    #[error("reading the archive: {0}")]
    Archive(io::Error),
}

#[derive(Debug, Default)]
pub struct Unpacked {
    /// SHA-256 of every regular file written, by path.
    pub hashes: BTreeMap<String, String>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Unpacks the entries `wanted` says yes to into `dest` (an existing directory).
pub fn unpack<R: Read>(
    archive: R,
    dest: &Path,
    wanted: &dyn Fn(&str, EntryKind) -> bool,
) -> Result<Unpacked, UnpackError> {
    let mut archive = tar::Archive::new(archive);
    let mut done = Unpacked::default();
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| UnpackError::Refused {
            path: shown.clone(),
            reason: reason.to_string(),
        };
        let name = std::str::from_utf8(&raw).map_err(|_| refuse("the name is not UTF-8"))?;
        let relative = safe_relative(name).map_err(|reason| refuse(&reason))?;
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => return Err(refuse("hard links are not restored")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse("device files are not restored"));
            }
            tar::EntryType::Fifo => return Err(refuse("FIFOs are not restored")),
            other => return Err(refuse(&format!("entry type {other:?} is not restored"))),
        };
        let name = name.trim_end_matches('/');
        if !wanted(name, kind) {
            continue;
        }
        let io_error = |source: io::Error| UnpackError::Io {
            path: shown.clone(),
            source,
        };
        let target = dest.join(&relative);
        let parent = relative.parent().unwrap_or(Path::new(""));
        ensure_dir(dest, parent).map_err(|reason| refuse(&reason))?;
        match kind {
            EntryKind::Dir => {
                ensure_dir(dest, &relative).map_err(|reason| refuse(&reason))?;
                done.dirs += 1;
            }
            EntryKind::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| refuse("a symlink without a target"))?
                    .into_owned();
                check_link(parent, &link).map_err(|reason| refuse(&reason))?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_error)?;
                done.symlinks += 1;
            }
            EntryKind::File => {
                let mode = entry.header().mode().unwrap_or(0o644) & 0o1777;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_error)?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                let mut bytes = 0u64;
                loop {
                    let n = entry.read(&mut buf).map_err(UnpackError::Archive)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).map_err(io_error)?;
                    bytes += n as u64;
                }
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_error)?;
                done.hashes
                    .insert(name.to_string(), hex::encode(hasher.finalize()));
                done.files += 1;
                done.bytes += bytes;
            }
        }
    }
    Ok(done)
}

/// A relative path of normal components only.
pub fn safe_relative(name: &str) -> Result<PathBuf, String> {
    let trimmed = name.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("empty path".into());
    }
    let path = Path::new(trimmed);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
            Component::ParentDir => return Err("`..` leaves the destination".into()),
            Component::CurDir => return Err("`.` in the path".into()),
        }
    }
    Ok(clean)
}

/// A symlink in `parent` pointing at `link` must stay inside the destination.
pub fn check_link(parent: &Path, link: &Path) -> Result<(), String> {
    if link.is_absolute() {
        return Err(format!("symlink to the absolute path {}", link.display()));
    }
    let mut depth: i64 = parent.components().count() as i64;
    for component in link.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute symlink".into()),
        }
        if depth < 0 {
            return Err(format!(
                "symlink to {} leaves the destination",
                link.display()
            ));
        }
    }
    Ok(())
}

/// Creates `relative` below `dest` one real directory at a time; an existing component
/// that is not a directory (a file, or a symlink anywhere) is refused.
pub fn ensure_dir(dest: &Path, relative: &Path) -> Result<(), String> {
    let mut current = dest.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a directory (links are never followed)",
                    current.display()
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&current).map_err(|err| format!("{}: {err}", current.display()))?;
            }
            Err(err) => return Err(format!("{}: {err}", current.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_relative_and_inside() {
        // Interior `.` components are normalised away by the path parser: still inside.
        for good in ["a", "a/b/c.txt", "dir/", "документ.pdf", "a/./b"] {
            assert!(safe_relative(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn links_must_not_leave_the_destination() {
        assert!(check_link(Path::new("a/b"), Path::new("../c")).is_ok());
        assert!(check_link(Path::new("a/b"), Path::new("../../c")).is_ok());
        assert!(check_link(Path::new("a/b"), Path::new("../../../c")).is_err());
        assert!(check_link(Path::new(""), Path::new("../c")).is_err());
        assert!(check_link(Path::new("a"), Path::new("/etc/passwd")).is_err());
        assert!(check_link(Path::new("a"), Path::new("x/../../..")).is_err());
    }
}
