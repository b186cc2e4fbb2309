//! Typed settings: compiled-in `config/default.toml` → `config/<BACKUP_ENV>.toml` → environment.
//!
//! The environment layer understands the seed's variable names (`DATABASE_URL`,
//! `BACKUP_S3_BUCKET`, …) and, above them, `BACKUP__SECTION__KEY` overrides. Every
//! value is checked at start; an error names the key it is about. Secrets are
//! [`SecretString`]s and only leave their wrapper where a connection is made.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::model::TargetKind;
use crate::telemetry::redact_url;

/// The defaults, compiled in so the binary works from any directory.
const DEFAULTS: &str = include_str!("../config/default.toml");

/// Seed environment names and the setting each one sets.
const SEED_NAMES: &[(&str, &str)] = &[
    ("BACKUP_S3_ENDPOINT", "storage.s3_endpoint"),
    ("BACKUP_S3_BUCKET", "storage.s3_bucket"),
    ("BACKUP_S3_REGION", "storage.s3_region"),
    ("BACKUP_S3_ACCESS_KEY", "storage.s3_access_key"),
    ("BACKUP_S3_SECRET_KEY", "storage.s3_secret_key"),
    ("BACKUP_STORAGE_DIR", "storage.local_dir"),
    ("BACKUP_STORAGE_PREFIX", "storage.prefix"),
    ("DATABASE_URL", "postgres.database_url"),
    ("RESTORE_DATABASE_URL", "postgres.restore_url"),
    ("BACKUP_RETENTION_DAYS", "retention.days"),
    ("BACKUP_AGE_RECIPIENTS", "pipeline.age_recipients"),
    ("BACKUP_AGE_IDENTITY_FILE", "pipeline.age_identity_file"),
    ("RABBITMQ_URL", "rabbitmq.url"),
    ("REDIS_HOST", "redis.host"),
    ("REDIS_PORT", "redis.port"),
    ("REDIS_USERNAME", "redis.username"),
    ("REDIS_PASSWORD", "redis.password"),
    ("REDIS_TLS", "redis.tls"),
    (
        "RABBITMQ_MANAGEMENT_URL",
        "rabbitmq_definitions.management_url",
    ),
    ("RABBITMQ_MANAGEMENT_USER", "rabbitmq_definitions.user"),
    (
        "RABBITMQ_MANAGEMENT_PASSWORD",
        "rabbitmq_definitions.password",
    ),
    ("CONSUL_HTTP_ADDR", "consul.address"),
    ("CONSUL_HTTP_TOKEN", "consul.token"),
    ("DOCUMENTS_STORAGE_ROOT", "documents.root"),
    ("BACKUP_SCHEDULER_ID_SALT", "scheduler.id_salt"),
    ("BACKUP_SIGNING_KEY_FILE", "signing.secret_key_file"),
    ("BACKUP_SIGNING_PUBLIC_KEYS", "signing.public_keys"),
    ("BACKUP_WORKER_CONSUME", "messaging.consume"),
    ("BACKUP_RELAY_USERS", "messaging.relay_users"),
];

/// Settings whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "pipeline.age_recipients",
    "pipeline.accepted_recipients",
    "postgres.schemas",
    "postgres.exclude_schemas",
    "signing.public_keys",
    "authorization.grants",
    "authorization.anonymous",
    "restore.allowed_destinations",
    "restore.password_envs",
    "messaging.retry_delays",
    "messaging.relay_users",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub storage: StorageSettings,
    pub pipeline: PipelineSettings,
    pub postgres: PostgresSettings,
    pub retention: RetentionSettings,
    pub size_check: SizeCheckSettings,
    pub rabbitmq: RabbitmqSettings,
    pub http: HttpSettings,
    pub messaging: MessagingSettings,
    pub signing: SigningSettings,
    pub authorization: AuthorizationSettings,
    pub restore: RestoreSettings,
    pub scheduler: SchedulerSettings,
    pub redis: RedisSettings,
    pub rabbitmq_definitions: RabbitmqDefinitionsSettings,
    pub consul: ConsulSettings,
    pub documents: DocumentsSettings,
}

/// The worker's HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `host:port`; empty: no endpoint.
    pub listen: String,
    /// How often the metrics are read again from storage (catalog, audit records) and the
    /// dead letters counted.
    pub metrics_refresh: HumanDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: SecretString,
    pub tls: bool,
    pub tls_ca_file: PathBuf,
    pub mode: RedisMode,
    pub server_binary: PathBuf,
    /// How long `server_binary` may take to load an RDB: this, plus `load_limit_per_gib`
    /// for each GiB of the RDB.
    pub load_limit_base: HumanDuration,
    pub load_limit_per_gib: HumanDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Rdb,
    Keys,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqDefinitionsSettings {
    pub enabled: bool,
    pub management_url: String,
    pub user: String,
    pub password: SecretString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSettings {
    pub enabled: bool,
    pub address: String,
    pub token: SecretString,
    pub snapshot: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentsSettings {
    pub enabled: bool,
    pub root: PathBuf,
}

/// What the scheduler binary reads: the broker and its schedules, nothing else.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    pub rabbitmq: RabbitmqSettings,
    pub messaging: MessagingSettings,
    pub scheduler: SchedulerSettings,
}

/// What the broker-only commands read (`setup`, `enqueue`, `dlq`): the broker, nothing else,
/// so that a bad `DATABASE_URL` does not stop an operator from listing dead letters.
#[derive(Debug, Clone, Deserialize)]
pub struct BrokerConfig {
    pub rabbitmq: RabbitmqSettings,
    pub messaging: MessagingSettings,
    /// `dlq replay` checks each letter's original sender again.
    pub authorization: AuthorizationSettings,
    /// Where their audit records go.
    pub storage: StorageSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqSettings {
    pub url: SecretString,
    pub concurrency: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagingSettings {
    pub commands_exchange: String,
    pub commands_queue: String,
    pub notifications_exchange: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub retry_queue_prefix: String,
    pub lease_queue_prefix: String,
    /// `<prefix><target>`: the commands that found their target busy, in arrival order,
    /// for the step holding the target to run next (see [`crate::messaging::worker`]).
    pub waiting_queue_prefix: String,
    /// Where commands that decrypt (restore, drill, verify) go when the worker that received
    /// them holds no age identity: see [`crate::messaging::keyed`].
    pub keyed_queue: String,
    /// Which queues this worker consumes.
    pub consume: Consume,
    /// Broker users besides the worker's own whose re-publications are trusted to carry the
    /// original sender (the backup workers' user, on a key-holding worker with a user of its own).
    pub relay_users: Vec<String>,
    /// CLI operations (backup, restore, verify, drill, prune) publish `backup.*` events.
    pub cli_events: bool,
    pub retry_delays: Vec<HumanDuration>,
    pub max_attempts: u32,
    pub retry_jitter: f64,
    pub delivery_limit: u32,
    pub shutdown_timeout: HumanDuration,
}

/// The queues a worker consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consume {
    /// `backup.commands`, and the keyed queue too when an age identity is configured.
    Auto,
    /// `backup.commands` only.
    Commands,
    /// The keyed queue only: a key-holding worker that takes no backups.
    Keyed,
}

/// Signed manifests: see [`crate::storage::signing`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningSettings {
    /// The worker's minisign secret key file; empty: no signing.
    pub secret_key_file: PathBuf,
    /// minisign public keys that signatures are checked against.
    pub public_keys: Vec<String>,
    /// Accept manifests without a signature.
    pub allow_unsigned: bool,
}

/// Who may ask for what: see [`crate::authorization`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSettings {
    /// `<user>=<grant>` entries.
    pub grants: Vec<String>,
    /// The grants of a command without a `user_id`.
    pub anonymous: Vec<String>,
}

impl AuthorizationSettings {
    pub fn policy(&self) -> Result<crate::authorization::Policy, ConfigError> {
        crate::authorization::Policy::new(&self.grants, &self.anonymous).map_err(|reason| {
            ConfigError::Invalid {
                key: "authorization.grants",
                reason,
            }
        })
    }
}

/// Where restores may send data and write files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSettings {
    /// `host` or `host:port` of destinations other than the configured sources.
    pub allowed_destinations: Vec<String>,
    /// Environment variables a restore may name in `password_env`.
    pub password_envs: Vec<String>,
    /// Directory under which file restores land; empty: beside the documents root, and
    /// `restores/` for Redis files.
    pub root: PathBuf,
    /// Prove each artifact's stored SHA-256 before any byte of it reaches a database, a Redis
    /// server or the file system: it is downloaded to a staging file first.
    pub verify_first: bool,
    /// Where staging files go (unnamed, owner-only, gone when closed); empty: the system's
    /// temporary directory.
    pub staging_dir: PathBuf,
}

impl RestoreSettings {
    /// The staging directory when artifacts are verified before use.
    pub fn staging(&self) -> Option<PathBuf> {
        self.verify_first.then(|| {
            if self.staging_dir.as_os_str().is_empty() {
                std::env::temp_dir()
            } else {
                self.staging_dir.clone()
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub missed_window: HumanDuration,
    /// The secret scheduled command ids are derived from.
    pub id_salt: SecretString,
    #[serde(default)]
    pub schedules: Vec<ScheduleSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub action: String,
    pub target: String,
    #[serde(default)]
    pub options: serde_json::Value,
}

/// A duration written as humantime reads it: `500ms`, `5s`, `2m`, `1h`, `1d`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub std::time::Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        parse_duration(&text).map(HumanDuration)
    }
}

/// The largest unit that divides it exactly, as one word (`90s`, `2m`, `1d`): retry queues
/// are named by it, so it has no spaces.
impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        let (value, unit) = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ]
        .into_iter()
        .find(|(size, _)| ms >= *size && ms.is_multiple_of(*size))
        .map_or((ms, "ms"), |(size, unit)| (ms / size, unit));
        write!(f, "{value}{unit}")
    }
}

/// Parses a duration such as `500ms`, `5s`, `2m`, `1h`, `1d`; the error quotes the text.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("`{text}` is not a duration: {err}"))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub local_dir: PathBuf,
    pub prefix: String,
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_region: String,
    pub s3_access_key: String,
    pub s3_secret_key: SecretString,
    /// Send parts as `UNSIGNED-PAYLOAD` instead of signing each part's SHA-256.
    pub s3_unsigned_payload: bool,
    pub part_size_mib: u32,
    pub parts_in_flight: u32,
    /// S3 only: time to open a connection, and for one whole request (a part's upload too).
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
    /// S3 only: a failed or timed-out request is retried with backoff this many times, for
    /// at most `retry_timeout` after its first attempt.
    pub max_retries: u32,
    pub retry_timeout: HumanDuration,
    /// Permission bits left out of the files and directories crm-backup creates (octal).
    pub umask: String,
    /// S3 only: the bucket's quota (0: none known), for the free-space gauge.
    pub quota_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub zstd_level: i32,
    /// Levels that replace `zstd_level` for some targets (`redis = 1`).
    #[serde(default)]
    pub zstd_level_by_target: BTreeMap<String, i32>,
    pub zstd_workers: u32,
    pub chunk_kib: u32,
    /// How often a running operation logs its progress (and the worker's gauge moves).
    pub progress_every: HumanDuration,
    pub age_recipients: Vec<String>,
    pub age_identity_file: PathBuf,
    /// Fingerprints (`sha256:…`, as manifests record them) of other keys whose backups may
    /// be restored: older keys while the age key is rotated.
    #[serde(default)]
    pub accepted_recipients: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    pub enabled: bool,
    pub database_url: SecretString,
    /// A role without SUPERUSER that pg_restore connects as; empty: as `database_url`.
    pub restore_url: SecretString,
    pub maintenance_database: String,
    pub bin_dir: PathBuf,
    pub schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
    pub globals: bool,
}

/// A full backup whose raw size is below `drop_ratio` or above `jump_ratio` of the previous
/// full backup's is flagged (`size_drop`, `size_jump`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeCheckSettings {
    pub drop_ratio: f64,
    pub jump_ratio: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub days: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// Objects of a backup without a manifest are debris once they are this old.
    pub debris_grace: HumanDuration,
    /// Days a partial backup (a schema filter) is kept.
    pub partial_days: u32,
    /// The furthest `retain_until` may reach.
    pub max_retain: HumanDuration,
    /// Days audit records are kept.
    pub audit_days: u32,
}

impl Settings {
    /// Loads settings from the given environment map (tests pass their own).
    pub fn load(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut settings: Settings = layered(env)?.try_deserialize()?;
        settings.normalize();
        settings.validate()?;
        Ok(settings)
    }

    /// Trims list items (`a, b` in the environment) and drops empty ones.
    fn normalize(&mut self) {
        for list in [
            &mut self.pipeline.age_recipients,
            &mut self.postgres.schemas,
            &mut self.postgres.exclude_schemas,
            &mut self.signing.public_keys,
            &mut self.authorization.grants,
            &mut self.authorization.anonymous,
            &mut self.restore.allowed_destinations,
            &mut self.restore.password_envs,
        ] {
            *list = list
                .iter()
                .map(|item| item.trim().to_string())
                .filter(|item| !item.is_empty())
                .collect();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.pipeline.validate()?;
        self.storage.validate()?;
        self.messaging.validate()?;
        self.rabbitmq.validate()?;
        self.authorization.policy()?;
        crate::storage::signing::Verifier::new(&self.signing.public_keys, true).map_err(|err| {
            ConfigError::Invalid {
                key: "signing.public_keys",
                reason: err.to_string(),
            }
        })?;
        self.postgres.validate()?;
        self.redis.validate()?;
        if self.http.metrics_refresh.0.is_zero() {
            invalid("http.metrics_refresh", "must be longer than zero".into())?;
        }
        let ratios = &self.size_check;
        if !(ratios.drop_ratio >= 0.0 && ratios.drop_ratio <= 1.0) {
            invalid("size_check.drop_ratio", "must be between 0 and 1".into())?;
        }
        if !(ratios.jump_ratio >= 1.0 && ratios.jump_ratio.is_finite()) {
            invalid("size_check.jump_ratio", "must be 1 or more".into())?;
        }
        check_http_url(
            "rabbitmq_definitions.management_url",
            &self.rabbitmq_definitions.management_url,
        )?;
        check_http_url("consul.address", &self.consul.address)
    }

    /// Loads what the scheduler needs; other sections are ignored.
    pub fn scheduler(env: &HashMap<String, String>) -> Result<SchedulerConfig, ConfigError> {
        let config: SchedulerConfig = layered(env)?.try_deserialize()?;
        config.rabbitmq.validate()?;
        config.messaging.validate()?;
        if config.scheduler.id_salt.expose_secret().len() < 16 {
            invalid(
                "scheduler.id_salt",
                "set a secret of at least 16 characters (BACKUP_SCHEDULER_ID_SALT): scheduled \
                 command ids are derived from it, so that nobody can claim them in advance"
                    .into(),
            )?;
        }
        Ok(config)
    }

    /// Loads the storage settings alone (what `history` reads).
    pub fn storage(env: &HashMap<String, String>) -> Result<StorageSettings, ConfigError> {
        #[derive(Deserialize)]
        struct StorageOnly {
            storage: StorageSettings,
        }
        let config: StorageOnly = layered(env)?.try_deserialize()?;
        Ok(config.storage)
    }

    /// Loads what the broker-only commands need; other sections are ignored.
    pub fn broker(env: &HashMap<String, String>) -> Result<BrokerConfig, ConfigError> {
        let config: BrokerConfig = layered(env)?.try_deserialize()?;
        config.rabbitmq.validate()?;
        config.messaging.validate()?;
        config.authorization.policy()?;
        Ok(config)
    }

    /// The age identity file, when one is configured.
    pub fn identity_file(&self) -> Option<&Path> {
        let path = self.pipeline.age_identity_file.as_path();
        (!path.as_os_str().is_empty()).then_some(path)
    }
}

/// A `ConfigError::Invalid` for `key`.
fn invalid(key: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid { key, reason })
}

fn check_http_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(()),
        _ => invalid(key, format!("`{}` is not an http(s) URL", redact_url(url))),
    }
}

impl PipelineSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.progress_every.0.is_zero() {
            return invalid("pipeline.progress_every", "must be longer than zero".into());
        }
        if !(1..=19).contains(&self.zstd_level) {
            return invalid(
                "pipeline.zstd_level",
                format!("{} is outside 1..=19", self.zstd_level),
            );
        }
        for (target, level) in &self.zstd_level_by_target {
            if let Err(unknown) = target.parse::<TargetKind>() {
                return invalid("pipeline.zstd_level_by_target", unknown.to_string());
            }
            if !(1..=19).contains(level) {
                return invalid(
                    "pipeline.zstd_level_by_target",
                    format!("{target} = {level} is outside 1..=19"),
                );
            }
        }
        if self.zstd_workers > 64 {
            return invalid(
                "pipeline.zstd_workers",
                format!("{} is more than 64", self.zstd_workers),
            );
        }
        if !(16..=16 * 1024).contains(&self.chunk_kib) {
            return invalid(
                "pipeline.chunk_kib",
                format!("{} is outside 16..=16384", self.chunk_kib),
            );
        }
        for recipient in &self.age_recipients {
            if recipient.parse::<age::x25519::Recipient>().is_err() {
                return invalid(
                    "pipeline.age_recipients",
                    format!("`{recipient}` is not an age X25519 public key (age1…)"),
                );
            }
        }
        Ok(())
    }
}

impl StorageSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(5..=4096).contains(&self.part_size_mib) {
            return invalid(
                "storage.part_size_mib",
                format!(
                    "{} is outside 5..=4096 (S3 parts are at least 5 MiB)",
                    self.part_size_mib
                ),
            );
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return invalid(
                "storage.parts_in_flight",
                format!("{} is outside 1..=64", self.parts_in_flight),
            );
        }
        let second = std::time::Duration::from_secs(1);
        for (key, value, most) in [
            ("storage.connect_timeout", self.connect_timeout, 300),
            ("storage.request_timeout", self.request_timeout, 3600),
            // object_store signs a request once and retries it as signed: keep its
            // retries well inside a signature's 15-minute validity.
            ("storage.retry_timeout", self.retry_timeout, 600),
        ] {
            if value.0 < second || value.0 > most * second {
                return invalid(key, format!("{value} is outside 1s..={most}s"));
            }
        }
        if self.max_retries > 100 {
            return invalid(
                "storage.max_retries",
                format!("{} is outside 0..=100", self.max_retries),
            );
        }
        if !self.s3_bucket.is_empty() {
            if !self.s3_endpoint.is_empty()
                && let Err(err) = url::Url::parse(&self.s3_endpoint)
            {
                return invalid(
                    "storage.s3_endpoint",
                    format!("`{}` is not a URL: {err}", redact_url(&self.s3_endpoint)),
                );
            }
            if self.s3_access_key.is_empty() != self.s3_secret_key.expose_secret().is_empty() {
                return invalid(
                    "storage.s3_access_key",
                    "set both BACKUP_S3_ACCESS_KEY and BACKUP_S3_SECRET_KEY, or neither".into(),
                );
            }
        } else if self.local_dir.as_os_str().is_empty() {
            return invalid(
                "storage.local_dir",
                "empty, and no S3 bucket is configured".into(),
            );
        }
        if self.umask_bits().is_none() {
            return invalid(
                "storage.umask",
                format!("`{}` is not an octal mask such as 077", self.umask),
            );
        }
        if self.prefix.starts_with('/') || self.prefix.split('/').any(|part| part == "..") {
            return invalid(
                "storage.prefix",
                format!("`{}` must be a relative key prefix", self.prefix),
            );
        }
        Ok(())
    }
}

impl StorageSettings {
    /// `umask` as permission bits.
    pub fn umask_bits(&self) -> Option<u32> {
        u32::from_str_radix(&self.umask, 8)
            .ok()
            .filter(|bits| *bits <= 0o777)
    }
}

impl RabbitmqSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return invalid("rabbitmq.concurrency", "must be at least 1".into());
        }
        Ok(())
    }
}

impl PostgresSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let database = postgres_url("postgres.database_url", &self.database_url)?;
        if self.restore_url.expose_secret().is_empty() {
            return Ok(());
        }
        let restore = postgres_url("postgres.restore_url", &self.restore_url)?;
        if (restore.host_str(), restore.port()) != (database.host_str(), database.port()) {
            return invalid(
                "postgres.restore_url",
                "must name the same server (host and port) as DATABASE_URL".into(),
            );
        }
        Ok(())
    }
}

/// A `postgres://` URL; the error names the setting, never the URL (it holds a password).
fn postgres_url(key: &'static str, value: &SecretString) -> Result<url::Url, ConfigError> {
    match url::Url::parse(value.expose_secret()) {
        Ok(url) if matches!(url.scheme(), "postgres" | "postgresql") => Ok(url),
        Ok(url) => Err(ConfigError::Invalid {
            key,
            reason: format!(
                "scheme `{}` is not postgres:// or postgresql://",
                url.scheme()
            ),
        }),
        Err(err) => Err(ConfigError::Invalid {
            key,
            reason: format!("not a URL: {err}"),
        }),
    }
}

impl RedisSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return invalid("redis.host", "is empty".into());
        }
        let ca = &self.tls_ca_file;
        if self.tls && !ca.as_os_str().is_empty() && !ca.is_file() {
            return invalid(
                "redis.tls_ca_file",
                format!("{} is not a file", ca.display()),
            );
        }
        Ok(())
    }
}

/// The layered configuration: compiled-in defaults, files, then the environment.
fn layered(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let dir = PathBuf::from(
        env.get("BACKUP_CONFIG_DIR")
            .map(String::as_str)
            .unwrap_or("config"),
    );
    let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
    let default_file = dir.join("default.toml");
    if default_file.is_file() {
        builder = builder.add_source(File::from(default_file).format(FileFormat::Toml));
    }
    if let Some(name) = env.get("BACKUP_ENV").filter(|name| !name.is_empty()) {
        let path = dir.join(format!("{name}.toml"));
        if !path.is_file() {
            return Err(ConfigError::File {
                path,
                reason: format!("BACKUP_ENV={name} but this file does not exist"),
            });
        }
        builder = builder.add_source(File::from(path).format(FileFormat::Toml));
    }
    // Seed names first, `BACKUP__SECTION__KEY` above them: two environment sources,
    // the seed one with its names translated to `SECTION__KEY`.
    let seeds = SEED_NAMES
        .iter()
        .filter_map(|(name, key)| {
            env.get(*name)
                .map(|value| (key.replace('.', "__").to_uppercase(), value.clone()))
        })
        .collect();
    let overrides = env
        .iter()
        .filter_map(|(name, value)| {
            name.strip_prefix("BACKUP__")
                .map(|rest| (rest.to_string(), value.clone()))
        })
        .collect();
    for source in [seeds, overrides] {
        builder = builder.add_source(environment_source(source));
    }
    Ok(builder.build()?)
}

/// An environment source over `SECTION__KEY` names, with the list settings split on commas.
fn environment_source(vars: HashMap<String, String>) -> Environment {
    let mut source = Environment::default()
        .separator("__")
        .list_separator(",")
        .try_parsing(true)
        .source(Some(vars));
    for key in LIST_KEYS {
        source = source.with_list_parse_key(key);
    }
    source
}

impl MessagingSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.retry_delays.is_empty() {
            return invalid("messaging.retry_delays", "needs at least one delay".into());
        }
        if self.retry_delays.iter().any(|d| d.0.is_zero()) {
            return invalid(
                "messaging.retry_delays",
                "a delay of zero would spin".into(),
            );
        }
        if self.max_attempts == 0 {
            return invalid("messaging.max_attempts", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.retry_jitter) {
            return invalid(
                "messaging.retry_jitter",
                format!("{} is outside [0, 1)", self.retry_jitter),
            );
        }
        if self.delivery_limit == 0 {
            return invalid("messaging.delivery_limit", "must be at least 1".into());
        }
        if self.keyed_queue.is_empty() || self.keyed_queue == self.commands_queue {
            return invalid(
                "messaging.keyed_queue",
                "must be a queue name of its own, not the commands queue".into(),
            );
        }
        if self.waiting_queue_prefix.is_empty()
            || self.waiting_queue_prefix == self.lease_queue_prefix
            || self.waiting_queue_prefix == self.retry_queue_prefix
        {
            return invalid(
                "messaging.waiting_queue_prefix",
                "must be a prefix of its own, not the lease or retry queues'".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("BACKUP_CONFIG_DIR".into(), "/nonexistent-config-dir".into());
        map
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        Settings::load(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_load_and_use_local_storage() {
        let settings = Settings::load(&env(&[])).unwrap();
        assert_eq!(settings.storage.local_dir, PathBuf::from("backups"));
        assert!(settings.storage.s3_bucket.is_empty());
        assert_eq!(settings.pipeline.zstd_level, 3);
        assert_eq!(settings.retention.daily, 7);
    }

    #[test]
    fn zstd_levels_per_target_override_the_default_level() {
        let codec = |settings: &Settings, target| {
            crate::pipeline::Codec::from_settings(&settings.pipeline)
                .for_target(target)
                .zstd_level
        };
        let defaults = Settings::load(&env(&[])).unwrap();
        assert_eq!(codec(&defaults, TargetKind::Redis), 1);
        assert_eq!(codec(&defaults, TargetKind::Postgres), 3);
        let settings = Settings::load(&env(&[
            ("BACKUP__PIPELINE__ZSTD_LEVEL", "5"),
            ("BACKUP__PIPELINE__ZSTD_LEVEL_BY_TARGET__REDIS", "2"),
            ("BACKUP__PIPELINE__ZSTD_LEVEL_BY_TARGET__DOCUMENTS", "9"),
        ]))
        .unwrap();
        assert_eq!(codec(&settings, TargetKind::Redis), 2);
        assert_eq!(codec(&settings, TargetKind::Documents), 9);
        assert_eq!(codec(&settings, TargetKind::Consul), 5);
        for (name, value, says) in [
            ("MONGO", "1", "unknown target `mongo`"),
            ("REDIS", "25", "redis = 25 is outside 1..=19"),
        ] {
            let key = format!("BACKUP__PIPELINE__ZSTD_LEVEL_BY_TARGET__{name}");
            let err = error_of(&[(key.as_str(), value)]);
            assert!(err.contains("pipeline.zstd_level_by_target"), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn seed_names_set_their_keys() {
        let settings = Settings::load(&env(&[
            ("BACKUP_S3_ENDPOINT", "http://127.0.0.1:3900"),
            ("BACKUP_S3_BUCKET", "backups"),
            ("BACKUP_S3_ACCESS_KEY", "GK1234"),
            ("BACKUP_S3_SECRET_KEY", "s3cr3t"),
            ("DATABASE_URL", "postgres://app:pw@db:5432/crm"),
            ("BACKUP_RETENTION_DAYS", "30"),
        ]))
        .unwrap();
        assert_eq!(settings.storage.s3_bucket, "backups");
        assert_eq!(settings.storage.s3_secret_key.expose_secret(), "s3cr3t");
        assert_eq!(settings.retention.days, 30);
        assert_eq!(
            settings.postgres.database_url.expose_secret(),
            "postgres://app:pw@db:5432/crm"
        );
    }

    #[test]
    fn double_underscore_overrides_win_over_seed_names() {
        let settings = Settings::load(&env(&[
            ("BACKUP_RETENTION_DAYS", "30"),
            ("BACKUP__RETENTION__DAYS", "9"),
            ("BACKUP__PIPELINE__ZSTD_LEVEL", "7"),
            ("BACKUP__POSTGRES__SCHEMAS", "crm, billing"),
        ]))
        .unwrap();
        assert_eq!(settings.retention.days, 9);
        assert_eq!(settings.pipeline.zstd_level, 7);
        assert_eq!(settings.postgres.schemas, vec!["crm", "billing"]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("BACKUP__PIPELINE__ZSTD_LEVEL", "abc")],
                "pipeline.zstd_level",
            ),
            (
                &[("BACKUP__PIPELINE__ZSTD_LEVEL", "40")],
                "pipeline.zstd_level",
            ),
            (&[("BACKUP_RETENTION_DAYS", "-3")], "retention.days"),
            (
                &[("BACKUP__STORAGE__PART_SIZE_MIB", "1")],
                "storage.part_size_mib",
            ),
            (
                &[("BACKUP__STORAGE__REQUEST_TIMEOUT", "0s")],
                "storage.request_timeout",
            ),
            (
                &[("BACKUP__STORAGE__RETRY_TIMEOUT", "soon")],
                "storage.retry_timeout",
            ),
            (
                &[("DATABASE_URL", "mysql://x@y/z")],
                "postgres.database_url",
            ),
            (
                &[("BACKUP_AGE_RECIPIENTS", "age1nope")],
                "pipeline.age_recipients",
            ),
            (
                &[("BACKUP_S3_BUCKET", "b"), ("BACKUP_S3_ACCESS_KEY", "GK1")],
                "storage.s3_access_key",
            ),
            (
                &[("BACKUP__MESSAGING__WAITING_QUEUE_PREFIX", "backup.lease.")],
                "messaging.waiting_queue_prefix",
            ),
        ];
        for (pairs, key) in cases {
            let message = error_of(pairs);
            assert!(
                message.contains(key),
                "{pairs:?}: `{message}` does not name {key}"
            );
        }
    }

    #[test]
    fn durations_parse_and_print() {
        let cases = [
            ("500ms", 500),
            ("5s", 5000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1d", 86_400_000),
            ("1h 30m", 5_400_000),
            ("1.5h", 5_400_000),
        ];
        for (text, ms) in cases {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(parsed.as_millis(), ms, "{text}");
            assert_eq!(
                parse_duration(&HumanDuration(parsed).to_string()).unwrap(),
                parsed
            );
        }
        assert_eq!(
            HumanDuration(parse_duration("90s").unwrap()).to_string(),
            "90s"
        );
        for bad in ["5", "s", "5 parsecs", "-1s", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let message = error_of(&[("BACKUP__MESSAGING__RETRY_DELAYS", "5s,forever")]);
        assert!(message.contains("forever"), "{message}");
        let message = error_of(&[("BACKUP__MESSAGING__RETRY_JITTER", "1.5")]);
        assert!(message.contains("messaging.retry_jitter"), "{message}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let message = error_of(&[("BACKUP__PIPELINE__ZSTD_LEVL", "3")]);
        assert!(message.contains("zstd_levl"), "{message}");
    }

    #[test]
    fn broker_commands_load_without_the_other_sections_being_valid() {
        let env = env(&[
            ("DATABASE_URL", "mysql://x@y/z"),
            ("BACKUP__PIPELINE__ZSTD_LEVEL", "99"),
        ]);
        assert!(Settings::load(&env).is_err());
        let broker = Settings::broker(&env).unwrap();
        assert_eq!(broker.messaging.commands_queue, "backup.commands");
        let env = self::env(&[("BACKUP__RABBITMQ__CONCURRENCY", "0")]);
        let err = Settings::broker(&env).unwrap_err().to_string();
        assert!(err.contains("rabbitmq.concurrency"), "{err}");
    }

    #[test]
    fn missing_environment_file_is_named() {
        let message = error_of(&[("BACKUP_ENV", "staging")]);
        assert!(message.contains("staging.toml"), "{message}");
    }

    #[test]
    fn errors_do_not_print_secrets() {
        let message = error_of(&[
            ("BACKUP_S3_BUCKET", "b"),
            ("BACKUP_S3_ENDPOINT", "http://user:hunter2@[bad"),
            ("BACKUP_S3_ACCESS_KEY", "GK1"),
            ("BACKUP_S3_SECRET_KEY", "x"),
        ]);
        assert!(!message.contains("hunter2"), "{message}");
    }
}
