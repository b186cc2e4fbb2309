//! The AMQP headers that carry a command's retry state (`x-attempt`, `x-last-error`, …).

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

pub const ATTEMPT: &str = "x-attempt";
pub const LAST_ERROR: &str = "x-last-error";
pub const ERROR_KIND: &str = "x-error-kind";
pub const FAILED_AT: &str = "x-failed-at";
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
pub const REPLAYED: &str = "x-replayed";
/// The original sender of a command the worker (or `dlq replay`, with the worker's
/// credentials) re-publishes: trusted only on messages whose `user_id` is the worker's own.
pub const SENDER: &str = "x-crm-sender";
/// Who replayed a dead letter (`cli:<user>`).
pub const REPLAYED_BY: &str = "x-replayed-by";
pub const DEATH: &str = "x-death";
/// Set by a quorum queue on a redelivery: how often it was returned before.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// On the worker's own copies of a delivery (retry tiers, waiting queues, the keyed queue, dead
/// letters): a copy of a command already done is acked without announcing the result again,
/// which the delivery that did it announced (or, if it died first, its redelivery will).
pub const COPY: &str = "x-crm-copy";

/// Whether a boolean header is set and true.
pub fn flag(properties: &BasicProperties, name: &str) -> bool {
    properties
        .headers()
        .as_ref()
        .and_then(|table| table.inner().get(name))
        .is_some_and(|value| matches!(value, AMQPValue::Boolean(true)))
}

/// Reads an integer header, whatever integer width the publisher used.
pub fn int(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The sender a command is checked as: the broker-verified `user_id`; on the re-publications
/// of a `relays` user (the worker's own user: retries, the steps of `all`, replays, hand-overs
/// to key-holding workers; and `messaging.relay_users`), the original sender it recorded in
/// [`SENDER`] (empty: a command that had no `user_id`). A [`SENDER`] header on anything else
/// is ignored.
pub fn sender(properties: &BasicProperties, relays: &[String]) -> Option<String> {
    let user_id = properties
        .user_id()
        .as_ref()
        .map(|user| user.as_str().to_string());
    if user_id
        .as_deref()
        .is_some_and(|user| relays.iter().any(|relay| relay == user))
        && let Some(original) = text(properties, SENDER)
    {
        return (!original.is_empty()).then_some(original);
    }
    user_id
}

/// The attempt number of a delivery (1 when the header is absent).
pub fn attempt(properties: &BasicProperties) -> u32 {
    int(properties, ATTEMPT)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// How many times the broker dead-lettered this message (quorum delivery limit), from `x-death`.
pub fn death_count(properties: &BasicProperties) -> i64 {
    let Some(AMQPValue::FieldArray(deaths)) = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DEATH))
    else {
        return 0;
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death {
            AMQPValue::FieldTable(table) => match table.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => Some(*n),
                Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
                _ => None,
            },
            _ => None,
        })
        .sum()
}

/// The headers of a delivery, to copy onto a retry or dead-letter copy.
pub fn copy(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}

pub fn set_int(table: &mut FieldTable, name: &str, value: i64) {
    table.insert(ShortString::from(name), AMQPValue::LongLongInt(value));
}

pub fn set_text(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

pub fn set_bool(table: &mut FieldTable, name: &str, value: bool) {
    table.insert(ShortString::from(name), AMQPValue::Boolean(value));
}

/// Removes a header (lapin's table has no remove: rebuild it).
pub fn without(table: &FieldTable, name: &str) -> FieldTable {
    let inner = table
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != name)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect::<std::collections::BTreeMap<_, _>>();
    FieldTable::from(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(user_id: Option<&str>, sender: Option<&str>) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(sender) = sender {
            set_text(&mut headers, SENDER, sender);
        }
        let properties = BasicProperties::default().with_headers(headers);
        match user_id {
            Some(user) => properties.with_user_id(ShortString::from(user)),
            None => properties,
        }
    }

    #[test]
    fn the_sender_header_counts_only_on_the_relays_messages() {
        let cases = [
            (Some("crm-api"), None, Some("crm-api")),
            (Some("crm-api"), Some("ops"), Some("crm-api")),
            (None, Some("ops"), None),
            (Some("worker"), Some("crm-api"), Some("crm-api")),
            (Some("worker"), Some(""), None),
            (Some("worker"), None, Some("worker")),
            (Some("backup-worker"), Some("crm-api"), Some("crm-api")),
            (Some("intruder"), Some("crm-api"), Some("intruder")),
        ];
        let relays = ["worker".to_string(), "backup-worker".to_string()];
        for (user_id, header, expected) in cases {
            assert_eq!(
                sender(&properties(user_id, header), &relays).as_deref(),
                expected,
                "{user_id:?} {header:?}"
            );
        }
    }
}
