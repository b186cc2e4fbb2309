//! Files that hold private keys (the age identity, the signing key) must be readable by
//! their owner only: a key others can read is a leaked key, refused before anyone relies on it.

use std::os::unix::fs::PermissionsExt;

/// Refuses `metadata` of a key file that group or others can access; the reason says how to
/// fix it.
pub fn check_owner_only(metadata: &std::fs::Metadata) -> Result<(), String> {
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "it is readable by others (mode {:o}): chmod 600 it",
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_only_modes_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "secret").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = check_owner_only(&std::fs::metadata(&path).unwrap());
            assert_eq!(result.is_ok(), ok, "mode {mode:o}: {result:?}");
        }
    }
}
