//! Recognizes a tree that already is what a restore makes: the same entries of the same kinds,
//! files of the same size, mode and SHA-256, links to the same targets. A restore whose worker
//! was killed after its tree took its final name, and before the command was marked done, is
//! redelivered: this is how that redelivery knows the tree for its own finished work instead
//! of refusing a destination that is not empty. Only an exact match counts, so a directory
//! anyone has changed since is still refused.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{EntryKind, IndexEntry};
use crate::pipeline::sha256;

/// True when `dir` holds exactly the tree `index` describes. Paths and sizes are compared
/// first, so a tree that differs is told apart without reading its files.
pub fn holds(dir: &Path, index: &[IndexEntry]) -> io::Result<bool> {
    let wanted: BTreeMap<&str, &IndexEntry> = index.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut files = Vec::new();
    let mut seen = 0usize;
    let mut pending: Vec<(PathBuf, String)> = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, relative)) = pending.pop() {
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(String::from) else {
                return Ok(false);
            };
            let relative = if relative.is_empty() {
                name
            } else {
                format!("{relative}/{name}")
            };
            let Some(expected) = wanted.get(relative.as_str()) else {
                return Ok(false);
            };
            let meta = fs::symlink_metadata(entry.path())?;
            let kind = meta.file_type();
            let same = match expected.kind {
                EntryKind::File => kind.is_file() && meta.len() == expected.size,
                EntryKind::Dir => kind.is_dir(),
                EntryKind::Symlink => {
                    kind.is_symlink()
                        && expected.link.as_deref().map(Path::new)
                            == Some(fs::read_link(entry.path())?.as_path())
                }
            };
            let same_mode =
                kind.is_symlink() || meta.permissions().mode() & 0o1777 == expected.mode & 0o1777;
            if !same || !same_mode {
                return Ok(false);
            }
            seen += 1;
            match expected.kind {
                EntryKind::File => files.push((entry.path(), *expected)),
                EntryKind::Dir => pending.push((entry.path(), relative)),
                EntryKind::Symlink => {}
            }
        }
    }
    if seen != wanted.len() {
        return Ok(false);
    }
    for (path, expected) in files {
        if Some(sha256::of_file(&path)?) != expected.sha256 {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, content: &[u8], mode: u32) -> IndexEntry {
        let mut hasher = sha256::Sha256::new();
        hasher.update(content);
        IndexEntry {
            path: path.into(),
            kind,
            size: if kind == EntryKind::File {
                content.len() as u64
            } else {
                0
            },
            mode,
            mtime: 0,
            mtime_nanos: 0,
            sha256: (kind == EntryKind::File).then(|| hasher.finish_hex()),
            link: (kind == EntryKind::Symlink).then(|| "a/f".into()),
            stored_in: None,
        }
    }

    /// A tree of `a/` (0755), `a/f` ("data", 0640) and `l -> a/f`, and its index.
    fn tree() -> (tempfile::TempDir, Vec<IndexEntry>) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::write(dir.path().join("a/f"), b"data").unwrap();
        std::os::unix::fs::symlink("a/f", dir.path().join("l")).unwrap();
        let set = |path: &str, mode| {
            fs::set_permissions(dir.path().join(path), fs::Permissions::from_mode(mode)).unwrap()
        };
        set("a", 0o755);
        set("a/f", 0o640);
        let index = vec![
            entry("a", EntryKind::Dir, b"", 0o755),
            entry("a/f", EntryKind::File, b"data", 0o640),
            entry("l", EntryKind::Symlink, b"", 0o777),
        ];
        (dir, index)
    }

    #[test]
    fn only_the_exact_tree_is_held() {
        let (dir, index) = tree();
        assert!(holds(dir.path(), &index).unwrap());

        let mut missing = index.clone();
        missing.push(entry("a/g", EntryKind::File, b"", 0o640));
        assert!(!holds(dir.path(), &missing).unwrap(), "an entry missing");
        assert!(
            !holds(dir.path(), &index[..2]).unwrap(),
            "an entry too many"
        );

        let mut other_content = index.clone();
        other_content[1] = entry("a/f", EntryKind::File, b"dada", 0o640);
        assert!(!holds(dir.path(), &other_content).unwrap(), "other content");

        let mut other_mode = index.clone();
        other_mode[1].mode = 0o600;
        assert!(!holds(dir.path(), &other_mode).unwrap(), "another mode");

        let mut other_link = index.clone();
        other_link[2].link = Some("a".into());
        assert!(
            !holds(dir.path(), &other_link).unwrap(),
            "another link target"
        );

        let mut other_kind = index;
        other_kind[0].kind = EntryKind::File;
        assert!(!holds(dir.path(), &other_kind).unwrap(), "another kind");
    }
}
