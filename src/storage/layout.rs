//! Keys in storage: where artifacts, manifests and command markers of a backup live.
//!
//! ```text
//! <target>/<backup_id>/<artifact>
//! <target>/<backup_id>/manifest.json     written last: the commit point of a backup
//! commands/<command_id>.json             marker of a finished command
//! ```

use crate::model::BackupId;

/// Directory of one backup: `<target>/<backup_id>/`.
pub fn backup_dir(id: &BackupId) -> String {
    format!("{}/{}/", id.target(), id)
}

pub fn artifact_key(id: &BackupId, artifact: &str) -> String {
    format!("{}{}", backup_dir(id), artifact)
}

pub fn manifest_key(id: &BackupId) -> String {
    artifact_key(id, MANIFEST_NAME)
}

pub const MANIFEST_NAME: &str = "manifest.json";
/// The largest manifest read back: far above any real one (a documents index of a million
/// files is about 250 MB), far below what would exhaust memory.
pub const MAX_MANIFEST_BYTES: u64 = 512 << 20;
/// The largest manifest signature or command marker read back.
pub const MAX_SMALL_OBJECT_BYTES: u64 = 1 << 20;

/// Where the markers of finished commands live.
pub const COMMANDS_DIR: &str = "commands/";

pub fn command_marker_key(command_id: &str) -> String {
    format!("{COMMANDS_DIR}{command_id}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let id: BackupId = "20261126T023000Z-postgres-k3f9".parse().unwrap();
        assert_eq!(
            artifact_key(&id, "crm.dump.zst"),
            "postgres/20261126T023000Z-postgres-k3f9/crm.dump.zst"
        );
        assert_eq!(
            manifest_key(&id),
            "postgres/20261126T023000Z-postgres-k3f9/manifest.json"
        );
        assert_eq!(command_marker_key("c1"), "commands/c1.json");
    }
}
