//! The catalog of backups, read from the manifests in storage (never from a database).

use bytes::Bytes;

use super::layout::{MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_SMALL_OBJECT_BYTES, manifest_key};
use super::manifest::Manifest;
use super::signing::{SIGNATURE_SUFFIX, Signer, SigningError, Trust, Verifier};
use super::{Storage, StorageError};
use crate::model::{BackupId, TargetKind};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("backup `{0}` not found (no manifest)")]
    NotFound(String),
    #[error("no backup of {0} exists yet")]
    NoBackups(TargetKind),
    #[error("manifest `{key}` is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Untrusted(#[from] SigningError),
}

impl CatalogError {
    pub fn retryable(&self) -> bool {
        match self {
            CatalogError::Storage(err) => err.retryable(),
            _ => false,
        }
    }
}

/// Which backup a command means: an id, or the newest of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupRef {
    Id(BackupId),
    Latest,
}

impl std::str::FromStr for BackupRef {
    type Err = crate::model::InvalidBackupId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            Ok(BackupRef::Latest)
        } else {
            s.parse().map(BackupRef::Id)
        }
    }
}

/// Listing result: good manifests, plus the keys of manifests that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    pub manifests: Vec<Manifest>,
    pub unreadable: Vec<(String, String)>,
}

/// Lists the backups of one target, oldest first.
pub async fn list(storage: &Storage, target: TargetKind) -> Result<Listing, CatalogError> {
    let mut listing = Listing::default();
    for dir in storage.list_dirs(&format!("{target}/")).await? {
        let key = format!("{dir}{MANIFEST_NAME}");
        match read_manifest(storage, &key)
            .await
            .and_then(|b| parse(&key, &b))
        {
            Ok(manifest) => listing.manifests.push(manifest),
            Err(err @ CatalogError::Corrupt { .. }) => {
                listing.unreadable.push((key, err.to_string()))
            }
            // A directory without a manifest is debris of an unfinished backup.
            Err(CatalogError::Storage(StorageError::NotFound { .. })) => {}
            Err(err) => return Err(err),
        }
    }
    // Ids sort by time to the second; the manifest's start time orders within a second.
    listing
        .manifests
        .sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    Ok(listing)
}

/// The newest backup of a target, or `None`: the same one [`list`] would put last, but
/// reading manifests newest first. Ids start with their start second, so once a manifest
/// is found only backups of that same second can still be newer.
pub async fn latest(
    storage: &Storage,
    target: TargetKind,
) -> Result<Option<Manifest>, CatalogError> {
    latest_where(storage, target, |_| true).await
}

/// The newest backup of `target` for which `wanted` holds (see [`latest`]).
pub async fn latest_where(
    storage: &Storage,
    target: TargetKind,
    wanted: impl Fn(&Manifest) -> bool,
) -> Result<Option<Manifest>, CatalogError> {
    let base = format!("{target}/");
    let mut ids: Vec<BackupId> = storage
        .list_dirs(&base)
        .await?
        .iter()
        .filter_map(|dir| dir.strip_prefix(&base)?.trim_end_matches('/').parse().ok())
        .collect();
    ids.sort_by(|a, b| b.as_str().cmp(a.as_str()));
    let mut newest: Option<Manifest> = None;
    for id in ids {
        if let Some(found) = &newest
            && id.started_at() < found.id.started_at()
        {
            break;
        }
        match get(storage, &id).await {
            Ok(manifest) if !wanted(&manifest) => {}
            Ok(manifest) => {
                let newer = newest.as_ref().is_none_or(|found| {
                    (manifest.started_at, &manifest.id) > (found.started_at, &found.id)
                });
                if newer {
                    newest = Some(manifest);
                }
            }
            // Debris of an unfinished backup, or a manifest `list` reports as unreadable.
            Err(CatalogError::NotFound(_) | CatalogError::Corrupt { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(newest)
}

/// Lists every target's backups, oldest first within each target.
pub async fn list_all(storage: &Storage) -> Result<Listing, CatalogError> {
    let mut all = Listing::default();
    for target in TargetKind::ALL {
        let listing = list(storage, target).await?;
        all.manifests.extend(listing.manifests);
        all.unreadable.extend(listing.unreadable);
    }
    Ok(all)
}

/// Loads one manifest by id.
pub async fn get(storage: &Storage, id: &BackupId) -> Result<Manifest, CatalogError> {
    let key = manifest_key(id);
    match read_manifest(storage, &key).await {
        Ok(bytes) => parse(&key, &bytes),
        Err(CatalogError::Storage(StorageError::NotFound { .. })) => {
            Err(CatalogError::NotFound(id.to_string()))
        }
        Err(err) => Err(err),
    }
}

/// The bytes of the manifest at `key`; one too large to read is as unreadable as a corrupt one.
async fn read_manifest(storage: &Storage, key: &str) -> Result<Bytes, CatalogError> {
    storage
        .get_bytes(key, MAX_MANIFEST_BYTES)
        .await
        .map_err(|err| match err {
            StorageError::TooLarge { .. } => CatalogError::Corrupt {
                key: key.to_string(),
                reason: err.to_string(),
            },
            other => other.into(),
        })
}

/// Resolves an id or `latest` for a target to a manifest.
pub async fn resolve(
    storage: &Storage,
    target: TargetKind,
    backup: &BackupRef,
) -> Result<Manifest, CatalogError> {
    match backup {
        BackupRef::Id(id) => {
            let manifest = get(storage, id).await?;
            if manifest.target != target {
                return Err(CatalogError::NotFound(format!(
                    "{id} (for target {target})"
                )));
            }
            Ok(manifest)
        }
        BackupRef::Latest => latest(storage, target)
            .await?
            .ok_or(CatalogError::NoBackups(target)),
    }
}

fn parse(key: &str, bytes: &Bytes) -> Result<Manifest, CatalogError> {
    serde_json::from_slice(bytes).map_err(|err| CatalogError::Corrupt {
        key: key.to_string(),
        reason: err.to_string(),
    })
}

/// Writes the manifest: the commit point of a backup. With a `signer`, its signature goes
/// first, so a visible manifest always has it; the manifest must name the signer's key
/// (`signing_key`).
pub async fn commit(
    storage: &Storage,
    manifest: &Manifest,
    signer: Option<&Signer>,
) -> Result<(), CatalogError> {
    let json = serde_json::to_vec_pretty(manifest).map_err(|err| CatalogError::Corrupt {
        key: manifest_key(&manifest.id),
        reason: err.to_string(),
    })?;
    let key = manifest_key(&manifest.id);
    let signature_key = format!("{key}{SIGNATURE_SUFFIX}");
    if let Some(signer) = signer {
        let signature = signer.sign(manifest.id.as_str(), &json)?;
        storage
            .put_bytes(&signature_key, Bytes::from(signature))
            .await?;
    }
    if let Err(err) = storage.put_bytes(&key, Bytes::from(json)).await {
        if signer.is_some() {
            // Best effort: what is left is debris, which prune removes after its grace.
            let _ = storage.delete(&signature_key).await;
        }
        return Err(err.into());
    }
    Ok(())
}

/// Reads a manifest and checks its signature: what restore, drill and verify use.
pub async fn get_trusted(
    storage: &Storage,
    id: &BackupId,
    verifier: &Verifier,
) -> Result<(Manifest, Trust), CatalogError> {
    let key = manifest_key(id);
    let bytes = match read_manifest(storage, &key).await {
        Ok(bytes) => bytes,
        Err(CatalogError::Storage(StorageError::NotFound { .. })) => {
            return Err(CatalogError::NotFound(id.to_string()));
        }
        Err(err) => return Err(err),
    };
    let signature = match storage
        .get_bytes(&format!("{key}{SIGNATURE_SUFFIX}"), MAX_SMALL_OBJECT_BYTES)
        .await
    {
        Ok(signature) => Some(signature),
        Err(StorageError::NotFound { .. }) => None,
        Err(err) => return Err(err.into()),
    };
    let trust = verifier.check(id.as_str(), &bytes, signature.as_deref())?;
    let manifest = parse(&key, &bytes)?;
    if manifest.id != *id {
        return Err(CatalogError::Corrupt {
            key,
            reason: format!("it describes backup {}", manifest.id),
        });
    }
    Ok((manifest, trust))
}

/// [`resolve`] with the signature checked; `latest` is the newest backup whose manifest can
/// be trusted (a newer one that cannot is skipped, with a warning).
pub async fn resolve_trusted(
    storage: &Storage,
    target: TargetKind,
    backup: &BackupRef,
    verifier: &Verifier,
) -> Result<(Manifest, Trust), CatalogError> {
    let checked = match backup {
        BackupRef::Id(id) => get_trusted(storage, id, verifier).await?,
        BackupRef::Latest => {
            let mut listing = list(storage, target).await?;
            let mut refused = None;
            loop {
                let Some(newest) = listing.manifests.pop() else {
                    return Err(refused.unwrap_or(CatalogError::NoBackups(target)));
                };
                match get_trusted(storage, &newest.id, verifier).await {
                    Ok(checked) => break checked,
                    Err(CatalogError::Untrusted(err)) => {
                        tracing::warn!(backup_id = %newest.id, error = %err, "skipping a manifest that cannot be trusted");
                        refused.get_or_insert(CatalogError::Untrusted(err));
                    }
                    Err(err) => return Err(err),
                }
            }
        }
    };
    if checked.0.target != target {
        return Err(CatalogError::NotFound(format!(
            "{} (for target {target})",
            checked.0.id
        )));
    }
    Ok(checked)
}
