//! crm-backup: backs up and restores the stateful parts of a CRM backend.
//!
//! Every artifact flows through one streaming pipeline — source → SHA-256 → zstd →
//! (age) → SHA-256 → object storage — and a backup exists only once its manifest, written
//! last, is in storage. The catalog is read from those manifests, so a disaster-recovery
//! restore needs nothing but the storage and the decryption key.
//!
//! # Layout
//!
//! - [`model`] — the words every layer shares: [`model::TargetKind`], [`model::BackupId`],
//!   [`model::Action`].
//! - [`config`] — typed settings: compiled-in defaults → `config/<BACKUP_ENV>.toml` →
//!   environment (seed names such as `DATABASE_URL`, then `BACKUP__SECTION__KEY`).
//! - [`options`] — the options each action takes per target, with their types.
//! - [`telemetry`] — tracing setup (JSON in production) and URL redaction.
//! - [`storage`] — the object store (local `backups/` or S3), the key layout
//!   ([`storage::layout`]), the manifest ([`storage::manifest`]), its signature
//!   ([`storage::signing`]) and the catalog read from manifests ([`storage::catalog`]).
//! - [`pipeline`] — hashing, zstd and age in both directions, off the async runtime,
//!   with bounded memory; multipart uploads that are aborted unless finished.
//! - `buffers` (private) — large buffers reused instead of freed (pipeline chunks, S3
//!   download ranges), and the allocator settings that give freed memory back.
//! - [`targets`] — one module per target behind the [`targets::Target`] trait:
//!   [`targets::postgres`], [`targets::redis`], [`targets::rabbitmq`],
//!   [`targets::consul`], [`targets::documents`]; child processes and HTTP APIs in
//!   the private `process` and `http` modules.
//! - [`jobs`] — what one command does (backup, restore, verify, drill, prune), knowing nothing
//!   about where the command came from.
//! - `private_file` (private) — the owner-only check of key files.
//! - [`retention`] — the pure keep/delete plan (daily/weekly/monthly/yearly) that prune applies.
//! - [`authorization`] — who may ask for what: the grants checked for every command.
//! - [`messaging`] — RabbitMQ: topology, command and event types, the confirm-mode
//!   publisher, the worker (dispatch, leases, retry policy) and dead letters.
//! - [`schedule`] — pure next-fire computation and fire ids for the scheduler.
//! - [`size_check`] — the pure size-drop / size-jump check of a finished backup.
//! - [`progress`] — bytes moved per target, for progress bars, log lines and a gauge.
//! - [`audit`] — the audit trail: one record per operation, logged and stored.
//! - [`metrics`] and [`endpoint`] — the worker's Prometheus metrics and its HTTP
//!   endpoint (`/healthz`, `/readyz`, `/metrics`).
//!
//! Binaries: `crm-backup` (`src/main.rs` and `src/cli/`: the worker and the operator CLI)
//! and `crm-backup-scheduler` (`src/bin/`: publishes scheduled commands; no storage,
//! database or Redis code linked in).

pub mod audit;
pub mod authorization;
mod buffers;
pub use buffers::return_large_frees;
pub mod config;
pub mod endpoint;
#[cfg(test)]
mod fuzz;
pub mod jobs;
pub mod messaging;
pub mod metrics;
pub mod model;
pub mod options;
pub mod pipeline;
mod private_file;
pub mod progress;
pub mod retention;
pub mod schedule;
pub mod size_check;
pub mod storage;
pub mod targets;
pub mod telemetry;
