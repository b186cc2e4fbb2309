//! How the CLI prints results: human-readable lines, or one JSON document per result.

use serde_json::json;

use crm_backup::audit::AuditRecord;
use crm_backup::jobs::JobError;
use crm_backup::model::TargetKind;
use crm_backup::storage::Storage;
use crm_backup::storage::manifest::Manifest;

pub use crm_backup::progress::human as human_bytes;

/// A finished backup: id, sizes, duration and throughput.
pub fn backup(storage: &Storage, manifest: &Manifest, json: bool) {
    let duration = manifest.duration();
    let seconds = duration.as_secs_f64().max(0.001);
    let throughput = manifest.raw_size() as f64 / seconds;
    if json {
        println!(
            "{}",
            json!({
                "target": manifest.target,
                "backup_id": manifest.id,
                "ok": true,
                "raw_size_bytes": manifest.raw_size(),
                "size_bytes": manifest.stored_size(),
                "duration_ms": duration.as_millis() as u64,
                "throughput_bytes_per_s": throughput as u64,
                "location": storage.location_of(&format!("{}/{}/", manifest.target, manifest.id)),
                "warnings": manifest.warnings,
            })
        );
    } else {
        println!(
            "{:<10} {}  raw {:>10}  stored {:>10}  {:>7.1} s  {}/s{}",
            manifest.target.as_str(),
            manifest.id,
            human_bytes(manifest.raw_size()),
            human_bytes(manifest.stored_size()),
            seconds,
            human_bytes(throughput as u64),
            if manifest.warnings.is_empty() {
                String::new()
            } else {
                format!("  WARNING: {}", manifest.warnings.join(", "))
            }
        );
    }
}

/// A step of `target` that failed (the others of an `all` still run).
pub fn failure(target: TargetKind, err: &JobError, json: bool) {
    if json {
        println!(
            "{}",
            json!({"target": target, "ok": false,
                   "error": {"kind": err.kind(), "message": err.to_string(), "retryable": err.retryable()}})
        );
    } else {
        println!("{:<10} FAILED: {err}", target.as_str());
    }
}

/// One line of `list`.
pub fn listed(manifest: &Manifest) -> String {
    format!(
        "{:<44} {:<10} {}  {:>10}  {:>10}  {}{}",
        manifest.id.as_str(),
        manifest.target.as_str(),
        manifest.finished_at.format("%Y-%m-%d %H:%M:%SZ"),
        human_bytes(manifest.stored_size()),
        human_bytes(manifest.raw_size()),
        manifest.requested_by,
        manifest
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
    )
}

/// The header of `history`'s table.
pub const HISTORY_HEADER: &str = "WHEN (UTC)           ACTION      TARGET     OUTCOME    USER / REQUESTED BY                BACKUP                                        SIZE        TOOK     NOTE";

/// One line of `history`.
pub fn history(record: &AuditRecord) -> String {
    let who = if record.requested_by.is_empty() || record.requested_by == record.user {
        or_dash(&record.user).to_string()
    } else {
        format!("{} / {}", or_dash(&record.user), record.requested_by)
    };
    let detail = |name: &str| record.details.as_ref().and_then(|d| d.get(name));
    let note = match (&record.error, detail("destination"), detail("warnings")) {
        (Some(error), _, _) => error.replace('\n', " "),
        (None, Some(destination), _) => {
            format!("into {}", destination.as_str().unwrap_or_default())
        }
        (None, None, Some(warnings)) => format!("WARNING: {warnings}"),
        (None, None, None) => String::new(),
    };
    format!(
        "{}  {:<11} {:<10} {:<10} {:<34} {:<45} {:>10}  {:>7}  {}",
        record.at.format("%Y-%m-%d %H:%M:%S"),
        record.action,
        record.target.as_deref().unwrap_or("-"),
        record.outcome.as_str(),
        who,
        record.backup_id.as_deref().unwrap_or("-"),
        record.raw_bytes.map_or("-".to_string(), human_bytes),
        format!("{:.1}s", record.duration_ms as f64 / 1000.0),
        note,
    )
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// The summary of one manifest that `show` prints without `--json`.
pub fn manifest(manifest: &Manifest) -> String {
    let mut lines = vec![
        format!("backup     {}", manifest.id),
        format!("target     {}", manifest.target),
        format!(
            "taken      {} to {} ({:.1} s)",
            manifest.started_at.format("%Y-%m-%d %H:%M:%SZ"),
            manifest.finished_at.format("%Y-%m-%d %H:%M:%SZ"),
            manifest.duration().as_secs_f64()
        ),
        format!(
            "by         {}{}",
            manifest.requested_by,
            manifest
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    ];
    if let Some(parent) = &manifest.parent {
        lines.push(format!("parent     {parent}"));
    }
    if let Some(until) = manifest.retain_until {
        lines.push(format!("kept until {}", until.format("%Y-%m-%d %H:%M:%SZ")));
    }
    for artifact in &manifest.artifacts {
        lines.push(format!(
            "artifact   {}  raw {} (sha256 {})  stored {} (sha256 {}){}",
            artifact.name,
            human_bytes(artifact.raw_size),
            artifact.raw_sha256,
            human_bytes(artifact.stored_size),
            artifact.stored_sha256,
            if artifact.encryption.is_some() {
                ", encrypted"
            } else {
                ""
            }
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
