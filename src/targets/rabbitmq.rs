//! RabbitMQ definitions (vhosts, users, exchanges, queues, bindings, policies, permissions)
//! through the management API: `GET /api/definitions`, restored with `POST /api/definitions`.
//!
//! Definitions hold users' password hashes: encrypt these backups (BACKUP_AGE_RECIPIENTS).

use std::collections::BTreeSet;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::ApiClient;
use super::{
    ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, exclusive_options,
    parse_options, read_limited,
};
use crate::config::RabbitmqDefinitionsSettings;
use crate::model::TargetKind;
use crate::pipeline::ArtifactReader;
use crate::storage::manifest::ArtifactRecord;
use crate::storage::manifest::Facts;

const KIND: TargetKind = TargetKind::Rabbitmq;
const ARTIFACT: &str = "definitions.json";
const FORMAT: &str = "rabbitmq-definitions-json";
/// Definitions are read whole to count and check them; a broker's are far below this.
const MAX_DEFINITIONS: usize = 512 * 1024 * 1024;
/// Sections whose objects belong to a vhost.
const VHOST_SECTIONS: [&str; 7] = [
    "permissions",
    "topic_permissions",
    "parameters",
    "policies",
    "queues",
    "exchanges",
    "bindings",
];

pub struct Rabbitmq {
    base: String,
    user: String,
    password: SecretString,
    guard: super::RestoreGuard,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupOptions {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOptions {
    /// Restore only this vhost.
    vhost: Option<String>,
    /// Beside the original: vhosts are renamed with this prefix (default
    /// `restored-<backup id>-`).
    vhost_prefix: Option<String>,
    /// Import as backed up, users included, into the original names.
    #[serde(default)]
    in_place: bool,
    /// Another broker's management API (listed in restore.allowed_destinations); it gets
    /// only the credentials of `user` and `password_env`, never the configured ones.
    management_url: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RabbitmqFacts {
    pub rabbitmq_version: Option<String>,
    pub vhosts: usize,
    pub users: usize,
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
    pub policies: usize,
    pub permissions: usize,
}

impl Rabbitmq {
    pub fn new(settings: &RabbitmqDefinitionsSettings, guard: super::RestoreGuard) -> Self {
        Rabbitmq {
            base: settings.management_url.clone(),
            user: settings.user.clone(),
            password: settings.password.clone(),
            guard,
        }
    }

    /// A client for the configured management API, with the configured credentials
    /// (credentials in its URL win).
    fn client(&self, url: &str) -> Result<(ApiClient, String, SecretString), TargetError> {
        let mut parsed = url::Url::parse(url).map_err(|err| TargetError::InvalidOptions {
            target: KIND,
            message: format!("management URL: {err}"),
        })?;
        let (user, password) = if parsed.username().is_empty() {
            (self.user.clone(), self.password.clone())
        } else {
            let user = percent_decode(parsed.username());
            let password =
                SecretString::from(percent_decode(parsed.password().unwrap_or_default()));
            (user, password)
        };
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let secrets = vec![password.expose_secret().to_string()];
        let client = ApiClient::new(KIND, parsed.as_str(), secrets)?;
        Ok((client, user, password))
    }

    /// Where a restore imports into: the configured API, or another broker's (checked by
    /// [`Rabbitmq::check`]) with the credentials the options name.
    fn destination(
        &self,
        options: &RestoreOptions,
    ) -> Result<(ApiClient, String, SecretString), TargetError> {
        let Some(url) = &options.management_url else {
            return self.client(&self.base);
        };
        let password = match &options.password_env {
            Some(name) => SecretString::from(self.guard.password_env(KIND, name)?),
            None => SecretString::from(String::new()),
        };
        let secrets = vec![password.expose_secret().to_string()];
        let client = ApiClient::new(KIND, url, secrets)?;
        Ok((client, options.user.clone().unwrap_or_default(), password))
    }

    /// Checks a restore's options (see `Target::check_restore`).
    fn check(&self, options: &RestoreOptions) -> Result<bool, TargetError> {
        let invalid = |message: String| TargetError::InvalidOptions {
            target: KIND,
            message,
        };
        exclusive_options(
            KIND,
            ("in_place", options.in_place),
            ("vhost_prefix", options.vhost_prefix.is_some()),
        )?;
        let other_broker = match &options.management_url {
            Some(url) => {
                let parsed = url::Url::parse(url)
                    .map_err(|err| invalid(format!("management_url: {err}")))?;
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    return Err(invalid(
                        "management_url carries credentials: name them with user and \
                         password_env instead"
                            .into(),
                    ));
                }
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(invalid("management_url is not http(s)".into()));
                }
                let host = parsed.host_str().unwrap_or_default();
                let port = parsed.port_or_known_default().unwrap_or(15672);
                let configured = url::Url::parse(&self.base).ok();
                let same = configured.as_ref().is_some_and(|c| {
                    c.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host))
                        && c.port_or_known_default() == Some(port)
                });
                if !same {
                    self.guard.destination(KIND, host, port)?;
                }
                !same
            }
            None => false,
        };
        if let Some(name) = &options.password_env {
            self.guard.check_password_env(KIND, name)?;
        }
        if (options.user.is_some() || options.password_env.is_some()) && !other_broker {
            return Err(invalid(
                "user and password_env are for another broker's management_url".into(),
            ));
        }
        if !other_broker && options.vhost_prefix.as_deref() == Some("") {
            return Err(invalid(
                "an empty vhost_prefix imports into the source's own vhosts: that is in place \
                 (in_place: true)"
                    .into(),
            ));
        }
        Ok(options.in_place && !other_broker)
    }

    async fn get_definitions(&self, url: &str) -> Result<Bytes, TargetError> {
        let (client, user, password) = self.client(url)?;
        let response = client
            .send(Method::GET, "api/definitions", |r| {
                r.basic_auth(user.as_str(), Some(password.expose_secret()))
            })
            .await?;
        let response = client
            .expect_success(response, "GET /api/definitions")
            .await?;
        client
            .body(response, MAX_DEFINITIONS, "GET /api/definitions")
            .await
    }

    async fn existing_users(
        &self,
        (client, user, password): &(ApiClient, String, SecretString),
    ) -> Result<BTreeSet<String>, TargetError> {
        let response = client
            .send(Method::GET, "api/users", |r| {
                r.basic_auth(user.as_str(), Some(password.expose_secret()))
            })
            .await?;
        let response = client.expect_success(response, "GET /api/users").await?;
        let body = client
            .body(response, MAX_DEFINITIONS, "GET /api/users")
            .await?;
        let users: Vec<Value> = serde_json::from_slice(&body)
            .map_err(|err| TargetError::Unusable(format!("GET /api/users: {err}")))?;
        Ok(users
            .iter()
            .filter_map(|u| u["name"].as_str().map(String::from))
            .collect())
    }

    async fn post_definitions(
        &self,
        (client, user, password): &(ApiClient, String, SecretString),
        definitions: &Value,
    ) -> Result<(), TargetError> {
        let response = client
            .send(Method::POST, "api/definitions", |r| {
                r.basic_auth(user.as_str(), Some(password.expose_secret()))
                    .json(definitions)
            })
            .await?;
        client
            .expect_success(response, "POST /api/definitions")
            .await?;
        Ok(())
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn count(definitions: &Value, section: &str) -> usize {
    definitions[section].as_array().map_or(0, Vec::len)
}

fn facts_of(definitions: &Value) -> RabbitmqFacts {
    RabbitmqFacts {
        rabbitmq_version: definitions["rabbitmq_version"]
            .as_str()
            .or(definitions["rabbit_version"].as_str())
            .map(String::from),
        vhosts: count(definitions, "vhosts"),
        users: count(definitions, "users"),
        exchanges: count(definitions, "exchanges"),
        queues: count(definitions, "queues"),
        bindings: count(definitions, "bindings"),
        policies: count(definitions, "policies"),
        permissions: count(definitions, "permissions"),
    }
}

pub(crate) fn parse_definitions(bytes: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|err| format!("not JSON: {err}"))?;
    if !value.is_object() || !value["vhosts"].is_array() {
        return Err("not RabbitMQ definitions (no `vhosts` list)".into());
    }
    Ok(value)
}

/// What to import: pure, so every rule is table-tested.
///
/// - `only`: keep the objects of that vhost alone (and no users or global parameters);
/// - `prefix`: rename every vhost (beside the original); users and global parameters are
///   broker-wide, so they are left out, and permissions are kept only for `known_users`.
pub fn plan_import(
    definitions: &Value,
    only: Option<&str>,
    prefix: Option<&str>,
    known_users: &BTreeSet<String>,
) -> Value {
    let keep = |vhost: &str| only.is_none_or(|only| only == vhost);
    let rename = |vhost: &str| match prefix {
        Some(prefix) => format!("{prefix}{vhost}"),
        None => vhost.to_string(),
    };
    let mut out = serde_json::Map::new();
    for key in [
        "rabbit_version",
        "rabbitmq_version",
        "product_name",
        "product_version",
    ] {
        if let Some(value) = definitions.get(key) {
            out.insert(key.into(), value.clone());
        }
    }
    let vhosts: Vec<Value> = definitions["vhosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["name"].as_str().is_some_and(keep))
        .map(|v| {
            let mut v = v.clone();
            v["name"] = json!(rename(v["name"].as_str().unwrap_or_default()));
            v
        })
        .collect();
    out.insert("vhosts".into(), json!(vhosts));
    for section in VHOST_SECTIONS {
        let objects: Vec<Value> = definitions[section]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["vhost"].as_str().is_some_and(keep))
            .filter(|o| {
                prefix.is_none()
                    || !section.ends_with("permissions")
                    || o["user"].as_str().is_some_and(|u| known_users.contains(u))
            })
            .map(|o| {
                let mut o = o.clone();
                o["vhost"] = json!(rename(o["vhost"].as_str().unwrap_or_default()));
                o
            })
            .collect();
        out.insert(section.into(), json!(objects));
    }
    let whole_broker = only.is_none() && prefix.is_none();
    for section in ["users", "global_parameters"] {
        let objects = if whole_broker {
            definitions[section].clone()
        } else {
            json!([])
        };
        out.insert(section.into(), objects);
    }
    Value::Object(out)
}

#[async_trait]
impl Target for Rabbitmq {
    fn check_restore(&self, options: &Value) -> Result<bool, TargetError> {
        self.check(&parse_options(KIND, options)?)
    }

    async fn backup(&self, options: &Value, sink: &mut ArtifactSink) -> Result<Facts, TargetError> {
        let _: BackupOptions = parse_options(KIND, options)?;
        let body = self.get_definitions(&self.base).await?;
        let definitions = parse_definitions(&body).map_err(|reason| TargetError::Tool {
            tool: "rabbitmq API".into(),
            message: format!("GET /api/definitions: {reason}"),
            retryable: false,
        })?;
        sink.store(ARTIFACT, FORMAT, body.to_vec()).await?;
        Ok(Facts::of(&facts_of(&definitions)))
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &Value,
    ) -> Result<RestoreReport, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        self.check(&options)?;
        let body = source
            .read_whole(source.record(ARTIFACT)?, MAX_DEFINITIONS as u64)
            .await?;
        let definitions = parse_definitions(&body).map_err(TargetError::Unusable)?;
        let url = options
            .management_url
            .clone()
            .unwrap_or_else(|| self.base.clone());
        let destination = self.destination(&options)?;
        let prefix = if options.in_place {
            None
        } else {
            Some(
                options
                    .vhost_prefix
                    .clone()
                    // One prefix per backup: a redelivered restore imports into the same
                    // vhosts (an import merges) instead of making another copy.
                    .unwrap_or_else(|| format!("restored-{}-", source.manifest.id)),
            )
        };
        let known_users = match prefix {
            Some(_) => self.existing_users(&destination).await?,
            None => BTreeSet::new(),
        };
        let import = plan_import(
            &definitions,
            options.vhost.as_deref(),
            prefix.as_deref(),
            &known_users,
        );
        if let Some(vhost) = &options.vhost
            && count(&import, "vhosts") == 0
        {
            return Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!("the backup has no vhost `{vhost}`"),
            });
        }
        self.post_definitions(&destination, &import).await?;
        let vhosts: Vec<String> = import["vhosts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(String::from))
            .collect();
        Ok(RestoreReport {
            destination: format!(
                "RabbitMQ {} vhosts {}",
                crate::telemetry::redact_url(&url),
                vhosts.join(", ")
            ),
            details: json!({
                "vhosts": vhosts,
                "in_place": options.in_place,
                "users_imported": count(&import, "users"),
                "facts": facts_of(&import),
            }),
        })
    }

    /// Nothing is imported into a broker (that would be the live one): the definitions
    /// are decoded, parsed as a restore would POST them, and counted against the facts.
    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        let expected: RabbitmqFacts = source.facts()?;
        let body = source
            .read_whole(source.record(ARTIFACT)?, MAX_DEFINITIONS as u64)
            .await?;
        let definitions = parse_definitions(&body).map_err(TargetError::Unusable)?;
        let found = facts_of(&definitions);
        let counts = |f: &RabbitmqFacts| {
            [
                ("vhosts", f.vhosts),
                ("users", f.users),
                ("exchanges", f.exchanges),
                ("queues", f.queues),
                ("bindings", f.bindings),
                ("policies", f.policies),
                ("permissions", f.permissions),
            ]
        };
        let differences: Vec<String> = counts(&expected)
            .iter()
            .zip(counts(&found))
            .filter(|((_, want), (_, got))| want != got)
            .map(|((name, want), (_, got))| {
                format!("{name}: {got} in the artifact, {want} recorded")
            })
            .collect();
        if !differences.is_empty() {
            return Err(TargetError::Mismatch(differences.join("; ")));
        }
        Ok(RestoreReport {
            destination: "definitions decoded and counted in memory (nothing imported)".into(),
            details: json!(found),
        })
    }

    async fn check_artifact(
        &self,
        _manifest: &crate::storage::manifest::Manifest,
        record: &ArtifactRecord,
        mut reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        let body = read_limited(&mut reader, &record.name, MAX_DEFINITIONS as u64).await?;
        let definitions = parse_definitions(&body)
            .map_err(|reason| TargetError::Unusable(format!("{}: {reason}", record.name)))?;
        let facts = facts_of(&definitions);
        Ok(format!(
            "definitions parse: {} vhosts, {} exchanges, {} queues, {} bindings",
            facts.vhosts, facts.exchanges, facts.queues, facts.bindings
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "rabbitmq_version": "3.10.8",
            "users": [{"name": "guest"}, {"name": "app"}],
            "global_parameters": [{"name": "cluster_name", "value": "x"}],
            "vhosts": [{"name": "/"}, {"name": "crm"}],
            "permissions": [
                {"user": "app", "vhost": "crm", "configure": ".*", "write": ".*", "read": ".*"},
                {"user": "gone", "vhost": "crm", "configure": ".*", "write": ".*", "read": ".*"}
            ],
            "queues": [{"name": "q1", "vhost": "crm"}, {"name": "q2", "vhost": "/"}],
            "exchanges": [{"name": "e1", "vhost": "crm"}],
            "bindings": [{"source": "e1", "vhost": "crm", "destination": "q1"}],
            "policies": [{"name": "p1", "vhost": "crm"}],
            "parameters": [],
            "topic_permissions": []
        })
    }

    #[test]
    fn the_options_structs_accept_what_the_options_table_lists() {
        use crate::model::Action;
        use crate::targets::tests::accepts_listed_options;
        accepts_listed_options::<BackupOptions>(Action::Backup, KIND);
        accepts_listed_options::<RestoreOptions>(Action::Restore, KIND);
    }

    #[test]
    fn in_place_import_keeps_everything() {
        let plan = plan_import(&sample(), None, None, &BTreeSet::new());
        assert_eq!(count(&plan, "users"), 2);
        assert_eq!(count(&plan, "queues"), 2);
        assert_eq!(count(&plan, "permissions"), 2);
        assert_eq!(plan["vhosts"][1]["name"], "crm");
    }

    #[test]
    fn one_vhost_keeps_only_its_objects() {
        let plan = plan_import(&sample(), Some("crm"), None, &BTreeSet::new());
        assert_eq!(plan["vhosts"], json!([{"name": "crm"}]));
        assert_eq!(count(&plan, "queues"), 1);
        assert_eq!(count(&plan, "users"), 0, "users are broker-wide");
        assert_eq!(count(&plan, "global_parameters"), 0);
    }

    #[test]
    fn beside_renames_every_vhost_reference_and_drops_unknown_users() {
        let known = BTreeSet::from(["app".to_string()]);
        let plan = plan_import(&sample(), Some("crm"), Some("restored-"), &known);
        assert_eq!(plan["vhosts"][0]["name"], "restored-crm");
        for section in ["queues", "exchanges", "bindings", "policies", "permissions"] {
            for object in plan[section].as_array().unwrap() {
                assert_eq!(object["vhost"], "restored-crm", "{section}");
            }
        }
        assert_eq!(
            count(&plan, "permissions"),
            1,
            "the permission of a missing user is dropped"
        );
        assert_eq!(count(&plan, "users"), 0);
    }
}
