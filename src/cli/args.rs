//! The command-line grammar. One rule for every command: the target is the first positional
//! argument (or `--target`), `all` where several targets make sense; the backup is
//! `--backup <id|latest>` (`all` for verify), `latest` by default; `--json` prints one JSON
//! document per result.

use clap::{Args, Parser, Subcommand, ValueEnum};

use crm_backup::model::{Action, TargetKind, TargetSelector};

#[derive(Parser)]
#[command(
    name = "crm-backup",
    version,
    about = "Backs up and restores the CRM's stateful services"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Back up now, without a broker: one line per target.
    Run {
        #[command(flatten)]
        target: TargetArgs,
        /// PostgreSQL: back up only this schema (repeatable).
        #[arg(long = "schema", value_name = "SCHEMA")]
        schemas: Vec<String>,
        /// PostgreSQL: leave this schema out (repeatable).
        #[arg(long = "exclude-schema", value_name = "SCHEMA")]
        exclude_schemas: Vec<String>,
        /// PostgreSQL: also dump roles (pg_dumpall --globals-only).
        #[arg(long)]
        globals: bool,
        #[command(flatten)]
        options: OptionArgs,
        /// Why this backup is taken (recorded in the manifest).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// List backups, oldest first.
    List {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Show one backup: its artifacts, sizes and facts (the manifest with --json).
    Show {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Restore a backup (beside the original unless --in-place --yes).
    Restore {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        backup: BackupArgs,
        /// PostgreSQL: the new database to restore into (must not exist).
        #[arg(long, conflicts_with = "in_place")]
        into: Option<String>,
        /// Restore over the original. Destructive: needs --yes.
        #[arg(long)]
        in_place: bool,
        /// Confirms a destructive restore.
        #[arg(long)]
        yes: bool,
        /// PostgreSQL: do not restore object ownership.
        #[arg(long)]
        no_owner: bool,
        #[command(flatten)]
        options: OptionArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Check stored and raw SHA-256 and the structure of every artifact.
    Verify {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Restore drill: verify a backup, restore it into a scratch place, compare with the
    /// manifest's facts, remove the scratch copy.
    Drill {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Apply the retention policy: delete what it does not keep, and the debris of
    /// unfinished backups. `--dry-run` prints the plan with a reason for every backup.
    Prune {
        #[command(flatten)]
        target: TargetArgs,
        /// Only print the plan: what is kept and by which rule, what would be deleted.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        output: Output,
    },
    /// What happened, newest first: backups, failures, restores, drills, prunes, replays,
    /// from the audit records in storage (of the worker and of the CLI).
    History {
        #[command(flatten)]
        target: TargetArgs,
        /// How far back, e.g. 7d, 12h, 30d.
        #[arg(long, default_value = "7d")]
        since: String,
        /// At most this many records.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        #[command(flatten)]
        output: Output,
    },
    /// Consume `backup.commands` and run steps until SIGTERM/SIGINT.
    Worker,
    /// Declare the RabbitMQ exchanges and queues (idempotent).
    Setup {
        #[command(flatten)]
        output: Output,
    },
    /// Publish a command to `backup.commands`.
    Enqueue {
        /// What the command asks for.
        #[arg(value_enum)]
        action: ActionArg,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        backup: BackupArgs,
        #[command(flatten)]
        options: OptionArgs,
        /// Why the command is sent (recorded in the manifest, the events and the audit log).
        #[arg(long)]
        reason: Option<String>,
        /// The command id (idempotency key); a new UUID by default.
        #[arg(long)]
        id: Option<String>,
        /// Wait for the command's result: exit 0 when completed, 1 when failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 30m.
        #[arg(long, default_value = "1h")]
        timeout: String,
        #[command(flatten)]
        output: Output,
    },
    /// Dead-lettered commands.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: id, action, target, attempts, last error, when.
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Republish dead letters to backup.commands with attempts reset.
    Replay {
        /// A dead letter's command id, as `dlq list` shows it (repeatable).
        #[arg(
            long = "id",
            value_name = "COMMAND_ID",
            required_unless_present = "all"
        )]
        ids: Vec<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Also replay restores (never those refused as unauthorized).
        #[arg(long)]
        include_restores: bool,
        /// Only show what would be replayed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        output: Output,
    },
}

/// The target of a command: positional, or `--target`.
#[derive(Args)]
pub struct TargetArgs {
    /// A target, or `all`.
    #[arg(value_enum, value_name = "TARGET")]
    positional: Option<TargetArg>,
    /// The same as the positional TARGET.
    #[arg(
        long = "target",
        value_enum,
        value_name = "TARGET",
        conflicts_with = "positional"
    )]
    flag: Option<TargetArg>,
}

impl TargetArgs {
    pub fn selector(&self) -> Option<TargetSelector> {
        self.positional.or(self.flag).map(TargetArg::selector)
    }
}

/// Which backup: `--backup <id|latest>` (and `all` where a command takes several).
#[derive(Args)]
pub struct BackupArgs {
    /// A backup id, `latest` (the default) or, for verify, `all`.
    #[arg(long, value_name = "ID", default_value = "latest")]
    pub backup: String,
}

/// Target options as `--option key=value`, typed by the option (see `crate::options`).
#[derive(Args)]
pub struct OptionArgs {
    /// A target option as key=value (repeatable), e.g. incremental=true, to=/srv/check,
    /// existing=skip, vhost=crm. With `run all`: documents.incremental=true.
    #[arg(long = "option", value_name = "KEY=VALUE")]
    pub pairs: Vec<String>,
}

#[derive(Args)]
pub struct Output {
    /// Print JSON: one document per result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    Postgres,
    Redis,
    Rabbitmq,
    Consul,
    Documents,
    All,
}

impl TargetArg {
    fn selector(self) -> TargetSelector {
        match self {
            TargetArg::Postgres => TargetSelector::One(TargetKind::Postgres),
            TargetArg::Redis => TargetSelector::One(TargetKind::Redis),
            TargetArg::Rabbitmq => TargetSelector::One(TargetKind::Rabbitmq),
            TargetArg::Consul => TargetSelector::One(TargetKind::Consul),
            TargetArg::Documents => TargetSelector::One(TargetKind::Documents),
            TargetArg::All => TargetSelector::All,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActionArg {
    Backup,
    Restore,
    Verify,
    Drill,
    Prune,
}

impl From<ActionArg> for Action {
    fn from(action: ActionArg) -> Self {
        match action {
            ActionArg::Backup => Action::Backup,
            ActionArg::Restore => Action::Restore,
            ActionArg::Verify => Action::Verify,
            ActionArg::Drill => Action::Drill,
            ActionArg::Prune => Action::Prune,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_target_is_positional_or_a_flag_in_every_command() {
        for args in [
            &["crm-backup", "restore", "postgres"][..],
            &["crm-backup", "restore", "--target", "postgres"],
        ] {
            let Command::Restore { target, backup, .. } = Cli::parse_from(args).command else {
                panic!("not a restore");
            };
            assert_eq!(
                target.selector(),
                Some(TargetSelector::One(TargetKind::Postgres))
            );
            assert_eq!(backup.backup, "latest");
        }
        assert!(
            Cli::try_parse_from(["crm-backup", "drill", "redis", "--target", "redis"]).is_err()
        );
        assert!(Cli::try_parse_from(["crm-backup", "run", "mysql"]).is_err());
    }
}
