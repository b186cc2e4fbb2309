//! RabbitMQ for tests: a fresh vhost (and users) per test, through the management API.
#![allow(dead_code)]

use std::process::Command;

use crm_backup::messaging::event::Event;

pub fn amqp_base() -> String {
    std::env::var("TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

pub fn management_base() -> String {
    std::env::var("TEST_RABBITMQ_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// Calls the management API with curl; returns the body. Panics on HTTP errors.
pub fn management(method: &str, path: &str, body: Option<&str>) -> String {
    let mut command = Command::new("curl");
    command.args([
        "-s",
        "-f",
        "-X",
        method,
        "-H",
        "content-type: application/json",
    ]);
    if let Some(body) = body {
        command.args(["-d", body]);
    }
    command.arg(format!("{}/api/{path}", management_base()));
    let out = command.output().expect("curl runs");
    assert!(
        out.status.success(),
        "management API {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of its own, deleted (with its users) when dropped.
pub struct TestVhost {
    pub name: String,
    users: Vec<String>,
}

impl TestVhost {
    /// Takes charge of a vhost made by the code under test, so it is deleted too.
    pub fn adopt(name: &str) -> Self {
        TestVhost {
            name: name.to_string(),
            users: Vec::new(),
        }
    }

    pub fn create(prefix: &str) -> Self {
        let name = super::unique(prefix);
        management("PUT", &format!("vhosts/{name}"), Some("{}"));
        let vhost = TestVhost {
            name,
            users: Vec::new(),
        };
        vhost.grant("guest");
        vhost
    }

    fn grant(&self, user: &str) {
        management(
            "PUT",
            &format!("permissions/{}/{user}", self.name),
            Some(r#"{"configure":".*","write":".*","read":".*"}"#),
        );
    }

    /// AMQP URL for guest on this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }

    /// Creates a user with full rights on this vhost; returns its AMQP URL.
    pub fn user(&mut self, prefix: &str) -> (String, String) {
        let user = super::unique(prefix);
        management(
            "PUT",
            &format!("users/{user}"),
            Some(r#"{"password":"test-password","tags":""}"#),
        );
        self.grant(&user);
        self.users.push(user.clone());
        let url = format!("amqp://{user}:test-password@127.0.0.1:5672/{}", self.name);
        (user, url)
    }

    /// Names of the open AMQP connections on this vhost.
    pub fn connections(&self) -> Vec<String> {
        let body = management("GET", &format!("vhosts/{}/connections", self.name), None);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect()
    }

    /// Closes a connection from the broker side, as an operator or a network failure would.
    pub fn close_connection(&self, name: &str) {
        let encoded: String = url_escape(name);
        management("DELETE", &format!("connections/{encoded}"), None);
    }

    pub fn queue_exists(&self, queue: &str) -> bool {
        Command::new("curl")
            .args(["-s", "-f", "-o", "/dev/null"])
            .arg(format!(
                "{}/api/queues/{}/{queue}",
                management_base(),
                self.name
            ))
            .status()
            .is_ok_and(|status| status.success())
    }

    pub fn queue_messages(&self, queue: &str) -> i64 {
        let body = management("GET", &format!("queues/{}/{queue}", self.name), None);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        value["messages"].as_i64().unwrap_or(-1)
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("curl")
            .args(["-s", "-X", "DELETE"])
            .arg(format!("{}/api/vhosts/{}", management_base(), self.name))
            .output();
        for user in &self.users {
            let _ = Command::new("curl")
                .args(["-s", "-X", "DELETE"])
                .arg(format!("{}/api/users/{user}", management_base()))
                .output();
        }
    }
}

/// Validates an event against schemas/event.schema.json; panics with the violations.
pub fn assert_valid_event(event: &Event) {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/event.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("event schema compiles");
    let instance = serde_json::to_value(event).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "event {instance} violates the schema: {errors:#?}"
    );
}
