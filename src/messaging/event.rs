//! Events on `backup.notifications`: `backup.started`, `backup.completed`, `backup.failed`
//! (`schemas/event.schema.json`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const STARTED: &str = "backup.started";
pub const COMPLETED: &str = "backup.completed";
pub const FAILED: &str = "backup.failed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub version: u32,
    pub event: String,
    pub command_id: String,
    pub correlation_id: Option<String>,
    /// The command's action and target as sent (`null` when the message could not be read).
    pub action: Option<String>,
    pub target: Option<String>,
    pub backup_id: Option<String>,
    pub set_id: Option<String>,
    /// What the command says of its sender (`cli:<user>` for the CLI's own runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    pub attempt: u32,
    pub at: DateTime<Utc>,
    pub duration_ms: Option<u64>,
    pub size_bytes: Option<u64>,
    pub raw_size_bytes: Option<u64>,
    pub sha256: Option<String>,
    pub location: Option<String>,
    pub error: Option<EventError>,
    /// Only on `backup.failed`: whether the command will be tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub will_retry: Option<bool>,
    /// `backup.completed` of a backup the size check flagged: `size_drop`, `size_jump`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
    /// Action-specific results (restore destination, verify report, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventError {
    pub kind: String,
    pub message: String,
    pub retryable: bool,
}

impl Event {
    /// An event with every optional field empty.
    pub fn new(event: &str, command_id: &str, attempt: u32) -> Self {
        Event {
            version: 1,
            event: event.to_string(),
            command_id: command_id.to_string(),
            correlation_id: None,
            action: None,
            target: None,
            backup_id: None,
            set_id: None,
            requested_by: None,
            attempt,
            at: Utc::now(),
            duration_ms: None,
            size_bytes: None,
            raw_size_bytes: None,
            sha256: None,
            location: None,
            error: None,
            will_retry: None,
            warnings: None,
            details: None,
        }
    }

    /// The routing key is the event name.
    pub fn routing_key(&self) -> &str {
        &self.event
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }
}
