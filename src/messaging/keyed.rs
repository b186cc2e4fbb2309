//! Commands that need the age identity, on workers that do not hold it.
//!
//! Backup workers need only the public recipients; restores, drills and verifies of an
//! encrypted backup need the private identity. Keeping that key off the backup workers means
//! another consumer must run those commands: a key-holding worker. Publishers keep sending
//! every command to `backup.commands`; a worker without the identity that receives one of
//! these (after checking its sender) hands it over to the keyed queue, which only key-holding
//! workers consume, with the sender it was checked as. Retries and dead letters go back
//! through `backup.commands` as for any command, and are handed over again.
//!
//! ```text
//! backup.commands ─► backup worker ─(restore | drill | verify)─► backup.commands.keyed ─► key-holding worker
//! ```
//!
//! With nobody consuming the keyed queue the command fails as retryable, so a missing
//! key-holding worker shows as retries and, at the end of the budget, a dead letter naming
//! it: never as a command silently waiting.

use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

use super::MessagingError;
use super::publisher::Publisher;
use super::topology;
use crate::config::{Consume, MessagingSettings};
use crate::model::Action;

/// Whether a worker must hand `action` over instead of running it: it needs the identity,
/// backups are encrypted here, and this worker holds no identity.
pub fn hands_over(action: Action, encrypts: bool, holds_identity: bool) -> bool {
    matches!(action, Action::Restore | Action::Drill | Action::Verify)
        && encrypts
        && !holds_identity
}

/// The queues a worker consumes.
pub fn queues(names: &MessagingSettings, holds_identity: bool) -> Vec<&str> {
    let commands = names.commands_queue.as_str();
    let keyed = names.keyed_queue.as_str();
    match names.consume {
        Consume::Commands => vec![commands],
        Consume::Keyed => vec![keyed],
        Consume::Auto if holds_identity => vec![commands, keyed],
        Consume::Auto => vec![commands],
    }
}

/// Why a command could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    #[error(
        "this {action} needs the age identity, which this worker does not hold, and no \
         key-holding worker consumes `{queue}`: start one with BACKUP_AGE_IDENTITY_FILE"
    )]
    NoKeyholder { action: Action, queue: String },
    #[error(transparent)]
    Broker(#[from] MessagingError),
}

/// Copies a delivery into the keyed queue, once a consumer is there to take it.
pub async fn hand_over(
    connection: &Connection,
    publisher: &Publisher,
    action: Action,
    body: &[u8],
    properties: &BasicProperties,
    headers: FieldTable,
) -> Result<(), HandOverError> {
    let queue = &publisher.names().keyed_queue;
    if topology::depth(connection, queue).await?.consumers == 0 {
        return Err(HandOverError::NoKeyholder {
            action,
            queue: queue.clone(),
        });
    }
    publisher.to_queue(queue, body, properties, headers).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn names(consume: Consume) -> MessagingSettings {
        let env = [("BACKUP_CONFIG_DIR".to_string(), "/nonexistent".to_string())];
        let mut names = Settings::load(&env.into_iter().collect())
            .expect("defaults load")
            .messaging;
        names.consume = consume;
        names
    }

    #[test]
    fn only_decrypting_actions_of_encrypted_backups_are_handed_over_by_workers_without_the_key() {
        for action in [Action::Restore, Action::Drill, Action::Verify] {
            assert!(hands_over(action, true, false), "{action}");
            assert!(!hands_over(action, true, true), "{action} with the key");
            assert!(!hands_over(action, false, false), "{action} unencrypted");
        }
        for action in [Action::Backup, Action::Prune] {
            assert!(!hands_over(action, true, false), "{action}");
        }
    }

    #[test]
    fn a_worker_consumes_the_keyed_queue_when_it_holds_the_key_or_is_told_to() {
        let auto = names(Consume::Auto);
        assert_eq!(queues(&auto, false), ["backup.commands"]);
        assert_eq!(
            queues(&auto, true),
            ["backup.commands", "backup.commands.keyed"]
        );
        assert_eq!(
            queues(&names(Consume::Keyed), true),
            ["backup.commands.keyed"]
        );
        assert_eq!(queues(&names(Consume::Commands), true), ["backup.commands"]);
    }
}
