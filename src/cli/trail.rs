//! The CLI's audit records (see `crm_backup::audit`): who ran what, as the operating
//! system knows the user, with the outcome, written when each operation ends.

use std::time::Instant;

use crm_backup::audit::{self, AuditRecord, Origin, Outcome};
use crm_backup::jobs::JobError;
use crm_backup::storage::Storage;

/// Where the CLI's records go, and who it runs as.
pub struct Trail {
    /// None when storage could not be opened (a broker command with a broken storage
    /// configuration): records then go to the log only.
    storage: Option<Storage>,
    user: String,
    requested_by: String,
}

impl Trail {
    pub fn new(storage: Option<Storage>) -> Self {
        Trail {
            storage,
            user: os_user(),
            requested_by: super::requester(),
        }
    }

    /// A record of `action` on `target`, to be completed and written by [`Trail::write`].
    pub fn record(&self, action: &str, target: Option<&str>) -> AuditRecord {
        let mut record = AuditRecord::new(Origin::Cli, &self.user, &self.requested_by, action);
        record.target = target.map(String::from);
        record
    }

    /// Writes `record`, ended now, of an operation that began at `started`.
    pub async fn write(&self, mut record: AuditRecord, started: Instant) {
        record.at = chrono::Utc::now();
        record.duration_ms = started.elapsed().as_millis() as u64;
        match &self.storage {
            Some(storage) => audit::write(storage, &record).await,
            None => {
                tracing::warn!(
                    target: "audit",
                    record = %serde_json::to_string(&record).unwrap_or_default(),
                    "audit (not stored: storage is not configured correctly)"
                );
            }
        }
    }
}

/// `record` with the outcome of a CLI command.
pub fn finished(
    record: AuditRecord,
    result: &Result<std::process::ExitCode, super::Failure>,
) -> AuditRecord {
    match result {
        Ok(_) => record,
        Err(super::Failure(message)) => record.failed(Outcome::Failed, "cli", message),
    }
}

/// `record` with the failure `err` of a job.
pub fn failed(record: AuditRecord, err: &JobError) -> AuditRecord {
    let outcome = match err {
        JobError::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failed,
    };
    record.failed(outcome, err.kind(), &err.to_string())
}

/// The user the process runs as, by its real user id (what `USER` says is not checked).
fn os_user() -> String {
    let uid = rustix::process::getuid().as_raw();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| user_of(&passwd, uid))
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// The name of `uid` in a passwd file.
fn user_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_id() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nops:x:1000:1000::/home/ops:/bin/sh\n";
        assert_eq!(user_of(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_of(passwd, 1000).as_deref(), Some("ops"));
        assert_eq!(user_of(passwd, 7), None);
    }
}
