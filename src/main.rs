//! `crm-backup`: the worker and the operator CLI (run, list, show, restore, verify, drill,
//! prune, worker, setup, enqueue, dlq); see `cli`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
