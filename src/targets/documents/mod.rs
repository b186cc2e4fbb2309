//! Documents: the file tree under `DOCUMENTS_STORAGE_ROOT` as a tar stream, with a per-file
//! index (path, size, mode, mtime, SHA-256) in the manifest; optionally incremental.
//!
//! An incremental backup stores only files changed since its parent; every index entry
//! names the backup that holds its content (`stored_in`), so a restore takes each file
//! from the right backup of the chain and nothing that was deleted comes back.

mod archive;
mod digests;
pub mod extract;
mod present;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::io::SyncIoBridge;

use self::archive::TarStream;
pub use self::archive::{EntryKind, IndexEntry, Skipped};
use self::digests::FileDigests;
use self::extract::unpack;
use super::{
    ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, exclusive_options,
    parse_options,
};
use crate::config::DocumentsSettings;
use crate::model::TargetKind;
use crate::pipeline::{ArtifactReader, PipelineError};
use crate::storage::manifest::Facts;
use crate::storage::manifest::{ArtifactRecord, Manifest};

const KIND: TargetKind = TargetKind::Documents;
const ARTIFACT: &str = "documents.tar";
const FORMAT: &str = "tar";

pub struct Documents {
    root: PathBuf,
    guard: super::RestoreGuard,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupOptions {
    /// Store only what changed since the previous documents backup.
    #[serde(default)]
    incremental: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOptions {
    /// An empty (or new) directory to restore into; default `<root>.restore-<backup id>`.
    to: Option<PathBuf>,
    /// Replace the document root: restored beside it, then swapped in; the old tree is
    /// kept as `<root>.replaced-<time>`.
    #[serde(default)]
    in_place: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DocumentsFacts {
    pub root: String,
    pub incremental: bool,
    /// Ancestors of an incremental backup, the full backup first.
    pub chain: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub total_bytes: u64,
    /// Files whose content is in this backup's own tar.
    pub stored_files: u64,
    pub stored_bytes: u64,
    pub skipped: Vec<Skipped>,
    pub changed_during_backup: Vec<String>,
    /// Paths of the parent that no longer exist (incremental).
    pub deleted: Vec<String>,
    pub index: Vec<IndexEntry>,
}

impl Documents {
    pub fn new(settings: &DocumentsSettings, guard: super::RestoreGuard) -> Self {
        Documents {
            root: settings.root.clone(),
            guard,
        }
    }

    /// Where a restore of `backup` writes: `to` below the restore root (default: the
    /// documents root's parent) and outside the live tree, or else `<root>.restore-<backup id>`
    /// beside it (one name per backup, so the redelivery of a restore finds what its first
    /// attempt wrote).
    fn destination(&self, options: &RestoreOptions, backup: &str) -> Result<PathBuf, TargetError> {
        exclusive_options(
            KIND,
            ("to", options.to.is_some()),
            ("in_place", options.in_place),
        )?;
        let Some(to) = &options.to else {
            return Ok(beside(&self.root, &format!("restore-{backup}")));
        };
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        let to = self.guard.file(KIND, to, parent)?;
        let live = std::fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        if to.starts_with(&live) {
            return Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!(
                    "{} is inside the live document tree: restore beside it, or in place",
                    to.display()
                ),
            });
        }
        Ok(to)
    }

    /// Restores the chain into `dest` (an empty or new directory) and checks every file;
    /// `in_place` then swaps it in for the root, keeping the old tree beside it. A tree that
    /// already is this backup's (`present::holds`: what an attempt killed before the command
    /// was marked done left) is taken as restored, so the redelivery completes.
    async fn restore_into(
        &self,
        source: &ArtifactSource,
        dest: &Path,
        in_place: bool,
    ) -> Result<RestoreReport, TargetError> {
        let facts = facts_of(&source.manifest)?;
        let mut details = json!({
            "directory": dest,
            "files": facts.files,
            "dirs": facts.dirs,
            "symlinks": facts.symlinks,
            "bytes": facts.total_bytes,
            "chain": facts.chain,
        });
        if in_place && holds_backup(&self.root, &facts).await? {
            details["directory"] = json!(self.root);
            details["already_restored"] = json!(true);
            return Ok(report(details));
        }
        match prepare_destination(dest)? {
            Destination::Filled if holds_backup(dest, &facts).await? => {
                details["already_restored"] = json!(true);
            }
            Destination::Filled => {
                return Err(TargetError::Refused(format!(
                    "{} is not empty; restore into an empty or new directory",
                    dest.display()
                )));
            }
            Destination::Empty { created } => {
                self.restore_staged(source, &facts, dest, created).await?;
            }
        }
        if in_place {
            let replaced = sibling(&self.root, "replaced");
            if self.root.exists() {
                std::fs::rename(&self.root, &replaced).map_err(|err| {
                    TargetError::Refused(format!(
                        "moving {} aside failed: {err}; the restored tree is in {}",
                        self.root.display(),
                        dest.display()
                    ))
                })?;
                details["previous_directory"] = json!(replaced);
            }
            std::fs::rename(dest, &self.root).map_err(|err| {
                TargetError::Refused(format!(
                    "moving {} into place failed: {err}",
                    dest.display()
                ))
            })?;
            details["directory"] = json!(self.root);
        }
        Ok(report(details))
    }

    /// Fills `dest` (empty; `created` by this restore) with the chain. Filled under a name of
    /// its own beside `dest` and renamed once every file is checked, so `dest` never holds a
    /// partial tree. A worker killed mid-restore leaves that name behind; the command's
    /// redelivery removes it and starts afresh.
    async fn restore_staged(
        &self,
        source: &ArtifactSource,
        facts: &DocumentsFacts,
        dest: &Path,
        created: bool,
    ) -> Result<(), TargetError> {
        let staging = beside(dest, "restoring");
        let restored = async {
            remove_tree(staging.clone()).await.map_err(|err| {
                TargetError::Refused(format!(
                    "cannot remove {} that an interrupted restore left: {err}",
                    staging.display()
                ))
            })?;
            if let Destination::Filled = prepare_destination(&staging)? {
                return Err(TargetError::Refused(format!(
                    "{} could not be emptied for the restore",
                    staging.display()
                )));
            }
            restore_chain(source, facts, &staging).await?;
            std::fs::remove_dir(dest)
                .and_then(|()| std::fs::rename(&staging, dest))
                .map_err(|err| {
                    TargetError::Refused(format!(
                        "moving {} to {} failed: {err}",
                        staging.display(),
                        dest.display()
                    ))
                })
        }
        .await;
        if restored.is_err() {
            let _ = remove_tree(staging).await;
            if created {
                let _ = std::fs::remove_dir(dest);
            }
        }
        restored
    }

    fn check_root(&self) -> Result<(), TargetError> {
        match std::fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!(
                    "DOCUMENTS_STORAGE_ROOT {} is not a directory",
                    self.root.display()
                ),
            }),
            Err(err) => Err(TargetError::Unreachable {
                target: KIND,
                message: format!("DOCUMENTS_STORAGE_ROOT {}: {err}", self.root.display()),
            }),
        }
    }
}

fn facts_of(manifest: &Manifest) -> Result<DocumentsFacts, TargetError> {
    manifest
        .source
        .parse()
        .map_err(|err| TargetError::Unusable(format!("manifest facts of {}: {err}", manifest.id)))
}

/// `<root>.<role>-<time>` next to the root.
fn sibling(root: &Path, role: &str) -> PathBuf {
    beside(
        root,
        &format!("{role}-{}", Utc::now().format("%Y%m%dT%H%M%S")),
    )
}

/// `<path>.<suffix>` next to `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "documents".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{name}.{suffix}"))
}

/// Removes the directory `dir` and everything in it, if it exists.
async fn remove_tree(dir: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What a restore found at its destination.
enum Destination {
    /// Missing (then `created`) or an empty directory: the restore fills it.
    Empty { created: bool },
    /// Something is there already.
    Filled,
}

/// Creates `dest`, or takes it as it is if it exists.
fn prepare_destination(dest: &Path) -> Result<Destination, TargetError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => Ok(match entries.next() {
            Some(_) => Destination::Filled,
            None => Destination::Empty { created: false },
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(|err| {
                TargetError::Refused(format!("cannot create {}: {err}", dest.display()))
            })?;
            Ok(Destination::Empty { created: true })
        }
        Err(err) => Err(TargetError::Refused(format!("{}: {err}", dest.display()))),
    }
}

/// True when `dir` holds exactly the tree of the backup `facts` describe.
async fn holds_backup(dir: &Path, facts: &DocumentsFacts) -> Result<bool, TargetError> {
    let (dir, index) = (dir.to_path_buf(), facts.index.clone());
    tokio::task::spawn_blocking(move || match present::holds(&dir, &index) {
        Ok(holds) => Ok(holds),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(TargetError::Refused(format!("{}: {err}", dir.display()))),
    })
    .await
    .map_err(|err| TargetError::Unusable(format!("comparing the tree failed: {err}")))?
}

fn report(details: Value) -> RestoreReport {
    RestoreReport {
        destination: format!(
            "directory {}",
            details["directory"].as_str().unwrap_or_default()
        ),
        details,
    }
}

#[async_trait]
impl Target for Documents {
    fn check_restore(&self, options: &Value) -> Result<bool, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        // Checks the options: the default name, which needs the backup, cannot be wrong.
        self.destination(&options, "")?;
        Ok(options.in_place)
    }

    fn needs_previous(&self, options: &Value) -> bool {
        parse_options::<BackupOptions>(KIND, options).is_ok_and(|options| options.incremental)
    }

    async fn backup(&self, options: &Value, sink: &mut ArtifactSink) -> Result<Facts, TargetError> {
        let options: BackupOptions = parse_options(KIND, options)?;
        self.check_root()?;
        let parent = match sink.previous() {
            Some(parent) if options.incremental => Some((parent.id.clone(), facts_of(parent)?)),
            _ => None,
        };
        let previous_index: BTreeMap<String, IndexEntry> = parent
            .as_ref()
            .map(|(_, facts)| {
                facts
                    .index
                    .iter()
                    .map(|e| (e.path.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let tree = TarStream::new(
            &self.root,
            previous_index.clone(),
            sink.backup_id().as_str(),
        );
        let streamed = sink
            .stream(ARTIFACT, FORMAT, tree, FileDigests::default())
            .await
            .map_err(|err| match err {
                PipelineError::Source(err) => TargetError::Tool {
                    tool: "tar".into(),
                    message: format!("archiving {}: {err}", self.root.display()),
                    retryable: err.kind() != std::io::ErrorKind::PermissionDenied,
                },
                other => other.into(),
            })?;
        let mut report = streamed.source.into_report();
        streamed
            .inspector
            .finish()
            .and_then(|digests| report.fill_digests(digests))
            .map_err(|reason| TargetError::Tool {
                tool: "tar".into(),
                message: format!("hashing the files of {}: {reason}", self.root.display()),
                retryable: false,
            })?;
        sink.commit(streamed.artifact).await?;
        let (previous, parent_facts) = match parent {
            Some((id, facts)) => {
                sink.set_parent(id.clone());
                (Some(id.to_string()), Some(facts))
            }
            None => (None, None),
        };
        if !report.changed_during_backup.is_empty() {
            tracing::warn!(files = ?report.changed_during_backup, "documents changed while they were read");
        }
        let present: BTreeSet<&str> = report.index.iter().map(|e| e.path.as_str()).collect();
        let deleted = previous_index
            .keys()
            .filter(|path| !present.contains(path.as_str()))
            .cloned()
            .collect();
        let count = |kind: EntryKind| report.index.iter().filter(|e| e.kind == kind).count() as u64;
        let mut chain = parent_facts.map(|f| f.chain).unwrap_or_default();
        chain.extend(previous);
        let facts = DocumentsFacts {
            root: self.root.display().to_string(),
            incremental: !chain.is_empty(),
            chain,
            files: count(EntryKind::File),
            dirs: count(EntryKind::Dir),
            symlinks: count(EntryKind::Symlink),
            total_bytes: report.index.iter().map(|e| e.size).sum(),
            stored_files: report.stored_files,
            stored_bytes: report.stored_bytes,
            skipped: report.skipped,
            changed_during_backup: report.changed_during_backup,
            deleted,
            index: report.index,
        };
        Ok(Facts::of(&facts))
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &Value,
    ) -> Result<RestoreReport, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        let dest = self.destination(&options, source.manifest.id.as_str())?;
        self.restore_into(source, &dest, options.in_place).await
    }

    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        // One name per tree, so that what an interrupted drill left (its worker killed) is
        // removed by the next one; steps on one target never run at once across workers.
        let scratch = beside(&self.root, "drill");
        remove_tree(scratch.clone()).await.map_err(|err| {
            TargetError::Refused(format!(
                "cannot remove {} that an interrupted drill left: {err}",
                scratch.display()
            ))
        })?;
        // The restore checks every file's size and SHA-256 against the index (the whole
        // chain for an incremental backup); it needs room for one copy of the tree.
        let restored = self.restore_into(source, &scratch, false).await;
        if let Err(err) = remove_tree(scratch.clone()).await {
            tracing::warn!(dir = %scratch.display(), error = %err, "could not remove the drill copy");
        }
        let mut report = restored?;
        report.destination = format!("scratch directory {} (removed)", scratch.display());
        Ok(report)
    }

    async fn check_artifact(
        &self,
        manifest: &Manifest,
        record: &ArtifactRecord,
        reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        let facts = facts_of(manifest)?;
        let own = manifest.id.to_string();
        let expected: BTreeMap<String, Option<String>> = facts
            .index
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.stored_in.as_deref() == Some(own.as_str()))
            .map(|e| (e.path.clone(), e.sha256.clone()))
            .collect();
        let name = record.name.clone();
        let hashes = tokio::task::spawn_blocking(move || list_hashes(SyncIoBridge::new(reader)))
            .await
            .map_err(|err| TargetError::Unusable(format!("{name}: {err}")))?
            .map_err(|err| TargetError::Unusable(format!("{}: {err}", record.name)))?;
        let mut problems = Vec::new();
        for (path, sha) in &expected {
            match hashes.get(path) {
                None => problems.push(format!("{path} is missing from the archive")),
                Some(actual) if Some(actual) != sha.as_ref() => {
                    problems.push(format!("{path}: SHA-256 {actual} differs from the index"))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = hashes.keys().find(|p| !expected.contains_key(*p)) {
            problems.push(format!("{extra} is in the archive but not in the index"));
        }
        if !problems.is_empty() {
            return Err(TargetError::Unusable(format!(
                "{}: {} ({} problems)",
                record.name,
                problems[0],
                problems.len()
            )));
        }
        Ok(format!(
            "tar listing matches the index; {} file hashes recomputed",
            expected.len()
        ))
    }
}

/// SHA-256 of every regular file in a tar stream, without writing anything.
fn list_hashes<R: std::io::Read>(reader: R) -> std::io::Result<BTreeMap<String, String>> {
    use sha2::{Digest, Sha256};
    let mut archive = tar::Archive::new(reader);
    let mut hashes = BTreeMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut hasher = Sha256::new();
        std::io::copy(&mut entry, &mut hasher)?;
        hashes.insert(path, hex::encode(hasher.finalize()));
    }
    // Read to the end, so the stream's own hashes are checked over every byte.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink())?;
    Ok(hashes)
}

/// Unpacks each backup of the chain, taking from each only what the final index says it holds.
async fn restore_chain(
    source: &ArtifactSource,
    facts: &DocumentsFacts,
    dest: &Path,
) -> Result<(), TargetError> {
    let own = source.manifest.id.to_string();
    let index: BTreeMap<String, IndexEntry> = facts
        .index
        .iter()
        .map(|e| (e.path.clone(), e.clone()))
        .collect();
    // The job resolved the ancestors from the manifests' `parent` links: they must be the
    // chain this backup's index was built on.
    let ancestors: Vec<String> = source
        .ancestors()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    if ancestors != facts.chain {
        return Err(TargetError::Unusable(format!(
            "the chain of {own} is {:?}, its parents are {ancestors:?}",
            facts.chain
        )));
    }
    let mut members: Vec<ArtifactSource> = source
        .ancestors()
        .iter()
        .map(|manifest| source.for_manifest(manifest.clone()))
        .collect();
    members.push(source.for_manifest(source.manifest.clone()));
    // Verified first: every backup of the chain is proven before the first byte is unpacked.
    let mut verified = Vec::new();
    if source.verifies_first() {
        for member_source in &members {
            verified.push(member_source.open(member_source.record(ARTIFACT)?).await?);
        }
    }
    let mut verified = verified.into_iter();
    let mut hashes = BTreeMap::new();
    for member_source in &members {
        let member = member_source.manifest.id.to_string();
        let record = member_source.record(ARTIFACT)?.clone();
        let decoded = match verified.next() {
            Some(decoded) => decoded,
            None => member_source.open(&record).await?,
        };
        let reader = SyncIoBridge::new(decoded.reader);
        let dest_owned = dest.to_path_buf();
        let index_for_member = index.clone();
        let member_id = member.clone();
        let last = member == own;
        let unpacked = tokio::task::spawn_blocking(move || {
            let wanted = |path: &str, kind: EntryKind| match index_for_member.get(path) {
                Some(entry) if entry.kind != kind => false,
                Some(entry) if kind == EntryKind::File => {
                    entry.stored_in.as_deref() == Some(member_id.as_str())
                }
                // Directories and links come from the newest backup only.
                Some(_) => last,
                None => false,
            };
            let mut reader = reader;
            let result = unpack(&mut reader, &dest_owned, &wanted);
            // Drain the rest so the stream's hashes cover every byte.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            result
        })
        .await
        .map_err(|err| TargetError::Unusable(format!("unpacking task failed: {err}")))?;
        decoded.verification.result().await?;
        let unpacked = unpacked.map_err(|err| TargetError::Unusable(err.to_string()))?;
        hashes.extend(unpacked.hashes);
    }
    finish_tree(dest, &index, &hashes)
}

/// Checks every file against the index, then sets modes and mtimes (directories last,
/// deepest first, since writing into a directory changes its mtime). Index paths come from a
/// manifest read back from storage: each must be a plain relative path (as tar entries must),
/// and metadata is applied through a descriptor opened without following symlinks, to an
/// entry of the kind the index says.
fn finish_tree(
    dest: &Path,
    index: &BTreeMap<String, IndexEntry>,
    hashes: &BTreeMap<String, String>,
) -> Result<(), TargetError> {
    for entry in index.values().filter(|e| e.kind == EntryKind::File) {
        let actual = hashes.get(&entry.path);
        if actual != entry.sha256.as_ref() {
            return Err(TargetError::Mismatch(format!(
                "{}: restored SHA-256 {:?} differs from the index {:?}",
                entry.path, actual, entry.sha256
            )));
        }
    }
    let mut ordered: Vec<&IndexEntry> = index
        .values()
        .filter(|e| e.kind != EntryKind::Symlink)
        .collect();
    ordered.sort_by_key(|e| {
        (
            e.kind == EntryKind::Dir,
            std::cmp::Reverse(e.path.matches('/').count()),
        )
    });
    for entry in ordered {
        let relative = extract::safe_relative(&entry.path).map_err(|reason| {
            TargetError::Unusable(format!("index entry `{}`: {reason}", entry.path))
        })?;
        let path = dest.join(relative);
        apply_metadata(&path, entry)
            .map_err(|err| TargetError::Refused(format!("{}: {err}", path.display())))?;
    }
    Ok(())
}

/// Sets the mode and mtime of the file or directory at `path`, which must be of the entry's
/// kind: opened with `O_NOFOLLOW`, so a symlink in its place is an error, not a way out.
fn apply_metadata(path: &Path, entry: &IndexEntry) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    let expected = match entry.kind {
        EntryKind::Dir => meta.is_dir(),
        _ => meta.is_file(),
    };
    if !expected {
        return Err(std::io::Error::other(format!(
            "is not the {:?} the index says",
            entry.kind
        )));
    }
    let when = filetime::FileTime::from_unix_time(entry.mtime, entry.mtime_nanos);
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o1777))?;
    filetime::set_file_handle_times(&file, None, Some(when))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_structs_accept_what_the_options_table_lists() {
        use crate::model::Action;
        use crate::targets::tests::accepts_listed_options;
        accepts_listed_options::<BackupOptions>(Action::Backup, KIND);
        accepts_listed_options::<RestoreOptions>(Action::Restore, KIND);
    }
}
