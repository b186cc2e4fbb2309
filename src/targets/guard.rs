//! Where a restore may send data and write files, checked before anything runs: hosts other
//! than the configured sources only when `restore.allowed_destinations` lists them, passwords
//! only from the environment variables `restore.password_envs` lists, files only below the
//! restore root, reached without symlinks.

use std::path::{Component, Path, PathBuf};

use super::TargetError;
use crate::config::RestoreSettings;
use crate::model::TargetKind;

#[derive(Debug, Clone, Default)]
pub struct RestoreGuard {
    allowed_destinations: Vec<String>,
    password_envs: Vec<String>,
    root: Option<PathBuf>,
}

impl RestoreGuard {
    pub fn new(settings: &RestoreSettings) -> Self {
        RestoreGuard {
            allowed_destinations: settings.allowed_destinations.clone(),
            password_envs: settings.password_envs.clone(),
            root: (!settings.root.as_os_str().is_empty()).then(|| settings.root.clone()),
        }
    }

    /// `host:port`, a destination that is not the configured source, must be listed.
    pub fn destination(
        &self,
        target: TargetKind,
        host: &str,
        port: u16,
    ) -> Result<(), TargetError> {
        let listed = self.allowed_destinations.iter().any(|allowed| {
            allowed.eq_ignore_ascii_case(host)
                || allowed.eq_ignore_ascii_case(&format!("{host}:{port}"))
        });
        if listed {
            Ok(())
        } else {
            Err(TargetError::InvalidOptions {
                target,
                message: format!(
                    "{host}:{port} is not the configured source and not in \
                     restore.allowed_destinations"
                ),
            })
        }
    }

    /// The value of environment variable `name`, which must be listed in
    /// `restore.password_envs` (and set).
    pub fn password_env(&self, target: TargetKind, name: &str) -> Result<String, TargetError> {
        if !self.password_envs.iter().any(|listed| listed == name) {
            return Err(TargetError::InvalidOptions {
                target,
                message: format!("password_env `{name}` is not in restore.password_envs"),
            });
        }
        std::env::var(name).map_err(|_| TargetError::InvalidOptions {
            target,
            message: format!("password_env `{name}` is not set on the worker"),
        })
    }

    /// Whether `name` may be named in `password_env` (without reading it).
    pub fn check_password_env(&self, target: TargetKind, name: &str) -> Result<(), TargetError> {
        if self.password_envs.iter().any(|listed| listed == name) {
            Ok(())
        } else {
            Err(TargetError::InvalidOptions {
                target,
                message: format!("password_env `{name}` is not in restore.password_envs"),
            })
        }
    }

    /// Whether `restore.root` is unset (each target then uses its own default root).
    pub fn is_default_root(&self) -> bool {
        self.root.is_none()
    }

    /// `path` (absolute, or relative to the root) when it lies below the restore root
    /// (`restore.root`, else `default_root`) and no existing component below the root is a
    /// symlink.
    pub fn file(
        &self,
        target: TargetKind,
        path: &Path,
        default_root: &Path,
    ) -> Result<PathBuf, TargetError> {
        let root = self.root.as_deref().unwrap_or(default_root);
        below_root(root, path).map_err(|message| TargetError::InvalidOptions { target, message })
    }
}

/// See [`RestoreGuard::file`].
fn below_root(root: &Path, path: &Path) -> Result<PathBuf, String> {
    let root = std::fs::canonicalize(root)
        .map_err(|err| format!("the restore root {}: {err}", root.display()))?;
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{} has a `..` component", path.display()));
    }
    let Ok(below) = path.strip_prefix(&root) else {
        return Err(format!(
            "{} is not below the restore root {} (restore.root)",
            path.display(),
            root.display()
        ));
    };
    let mut current = root.clone();
    for component in below.components() {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!("{} is a symlink", current.display()));
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
            Err(err) => return Err(format!("{}: {err}", current.display())),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_must_lie_below_the_root_without_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("restores");
        std::fs::create_dir_all(root.join("ok")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(
            below_root(&root, Path::new("ok/new.rdb")).unwrap(),
            root.join("ok/new.rdb")
        );
        assert_eq!(
            below_root(&root, &root.join("fresh")).unwrap(),
            root.join("fresh")
        );
        for bad in [
            "/etc/passwd",
            "../x",
            "ok/../../x",
            "escape/cron.d",
            "/tmp/x",
        ] {
            assert!(below_root(&root, Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn destinations_and_password_variables_must_be_listed() {
        let guard = RestoreGuard::new(&RestoreSettings {
            allowed_destinations: vec!["10.0.0.7".into(), "scratch:6380".into()],
            password_envs: vec!["SCRATCH_REDIS_PASSWORD".into()],
            root: PathBuf::new(),
            verify_first: true,
            staging_dir: PathBuf::new(),
        });
        let kind = TargetKind::Redis;
        assert!(guard.destination(kind, "10.0.0.7", 6379).is_ok());
        assert!(guard.destination(kind, "scratch", 6380).is_ok());
        assert!(guard.destination(kind, "scratch", 6379).is_err());
        assert!(guard.destination(kind, "127.0.0.1", 6391).is_err());
        assert!(
            guard
                .check_password_env(kind, "SCRATCH_REDIS_PASSWORD")
                .is_ok()
        );
        let err = guard
            .password_env(kind, "BACKUP_S3_SECRET_KEY")
            .unwrap_err();
        assert!(
            err.to_string().contains("not in restore.password_envs"),
            "{err}"
        );
    }
}
