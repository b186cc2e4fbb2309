//! Child processes of targets (`pg_dump`, `pg_restore`, …): spawning, stderr capture, exit checks.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::TargetError;
use crate::telemetry::scrub;

/// The last this many bytes of a tool's stderr are kept for its error message.
const STDERR_TAIL: usize = 4096;

/// Messages that mean the server or the network, not the request, was the problem.
const TRANSIENT_MARKERS: &[&str] = &[
    "could not connect",
    "connection to server",
    "server closed the connection",
    "connection refused",
    "timeout",
    "timed out",
    "the database system is starting up",
    "the database system is shutting down",
    "too many connections",
    "terminating connection",
    // A connection lost mid-stream, as libpq words it with and without TLS.
    "could not receive data from server",
    "could not send data to server",
    "ssl syscall error",
    "ssl connection has been closed unexpectedly",
    "connection reset by peer",
    "no connection to the server",
    "lost synchronization with server",
];

pub struct ToolProcess {
    pub child: Child,
    name: String,
    stderr: JoinHandle<String>,
}

impl ToolProcess {
    /// Spawns `program` with `args` and extra `env`; stdout and stdin as given, stderr captured.
    /// The child is killed if this handle is dropped.
    pub fn spawn<I, S>(
        program: &Path,
        args: I,
        env: &[(&str, String)],
        stdin: Stdio,
        stdout: Stdio,
    ) -> Result<Self, TargetError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| program.display().to_string());
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        clean_environment(&mut command);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().map_err(|err| TargetError::Tool {
            tool: name.clone(),
            message: format!("cannot start {}: {err}", program.display()),
            retryable: false,
        })?;
        if let Some(stdout) = child.stdout.as_ref() {
            widen_pipe(stdout);
        }
        let mut stderr = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut tail = Vec::new();
            if let Some(stderr) = stderr.as_mut() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        tail.drain(..tail.len() - STDERR_TAIL);
                    }
                }
            }
            let start = tail.len().saturating_sub(STDERR_TAIL);
            String::from_utf8_lossy(&tail[start..]).trim().to_string()
        });
        Ok(ToolProcess {
            child,
            name,
            stderr,
        })
    }

    /// Spawns like [`ToolProcess::spawn`] with stdout into a pipe that is read with blocking
    /// reads (never registered with the async runtime's `epoll`); returns its read end.
    pub fn spawn_to_pipe<I, S>(
        program: &Path,
        args: I,
        env: &[(&str, String)],
        stdin: Stdio,
    ) -> Result<(Self, std::io::PipeReader), TargetError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (reader, writer) = std::io::pipe().map_err(|err| TargetError::Tool {
            tool: program.display().to_string(),
            message: format!("cannot create a pipe: {err}"),
            retryable: true,
        })?;
        widen_pipe(&reader);
        // The write end lives on only in the child: `spawn` drops the command that holds it.
        let process = Self::spawn(program, args, env, stdin, Stdio::from(writer))?;
        Ok((process, reader))
    }

    /// The child's stdout (spawned with `Stdio::piped()`).
    pub fn take_stdout(&mut self) -> Result<tokio::process::ChildStdout, TargetError> {
        self.child
            .stdout
            .take()
            .ok_or_else(|| TargetError::Unusable(format!("{} has no stdout", self.name)))
    }

    /// The child's stdin (spawned with `Stdio::piped()`).
    pub fn take_stdin(&mut self) -> Result<tokio::process::ChildStdin, TargetError> {
        self.child
            .stdin
            .take()
            .ok_or_else(|| TargetError::Unusable(format!("{} has no stdin", self.name)))
    }

    /// Waits for the exit; anything but status 0 is an error carrying the stderr tail.
    /// `secrets` are scrubbed from that message.
    pub async fn wait(mut self, secrets: &[&str]) -> Result<String, TargetError> {
        let status = self.child.wait().await.map_err(|err| TargetError::Tool {
            tool: self.name.clone(),
            message: format!("waiting for it failed: {err}"),
            retryable: true,
        })?;
        let stderr = scrub(&self.stderr.await.unwrap_or_default(), secrets);
        if status.success() {
            return Ok(stderr);
        }
        Err(failure(&self.name, status, &stderr))
    }

    /// Kills the child (if still running) and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn failure(name: &str, status: ExitStatus, stderr: &str) -> TargetError {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended abnormally".to_string(),
    };
    let lower = stderr.to_lowercase();
    let retryable = status.signal().is_some()
        || TRANSIENT_MARKERS
            .iter()
            .any(|marker| lower.contains(marker));
    let detail = if stderr.is_empty() {
        String::new()
    } else {
        format!(
            ": {}",
            stderr
                .lines()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ")
        )
    };
    TargetError::Tool {
        tool: name.to_string(),
        message: format!("{name} {how}{detail}"),
        retryable,
    }
}

/// Pipes hold 64 KiB by default, which a dump streaming at hundreds of MB/s fills in a
/// fraction of a millisecond; 1 MiB lets the reader pause between reads without stalling
/// the child (see `ArtifactWriter::read_on_thread`). Failure to widen is harmless.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on a valid, owned file descriptor with an integer argument.
    let _ = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// A child starts with none of the worker's environment (which holds every secret it was
/// configured with) but what any tool needs: the search path and the locale. Each tool then
/// gets exactly the variables it is given (`PGPASSWORD` for the PostgreSQL tools).
pub fn clean_environment(command: &mut Command) {
    command.env_clear();
    for name in ["PATH", "LANG", "LC_ALL", "TZ"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
}

/// Runs a tool to completion and returns its stdout (for short outputs such as `--version`).
pub async fn output(program: &Path, args: &[&str]) -> Result<String, TargetError> {
    let mut command = Command::new(program);
    clean_environment(&mut command);
    let out = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|err| TargetError::Tool {
            tool: program.display().to_string(),
            message: format!("cannot start {}: {err}", program.display()),
            retryable: false,
        })?;
    if !out.status.success() {
        return Err(TargetError::Tool {
            tool: program.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            retryable: false,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How feeding a child's stdin ended.
#[derive(Debug)]
pub enum Pump {
    /// The reader reached its end and everything was written.
    Finished,
    /// The reader failed (a corrupt or unreadable artifact).
    ReaderFailed(std::io::Error),
    /// The child stopped reading; its exit status says why.
    WriterClosed,
}

/// Copies `reader` into `writer`, telling a failing source apart from a closed sink.
pub async fn pump<R, W>(reader: &mut R, writer: &mut W) -> Pump
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => return Pump::ReaderFailed(err),
        };
        if writer.write_all(&buf[..n]).await.is_err() {
            return Pump::WriterClosed;
        }
    }
    match writer.shutdown().await {
        Ok(()) => Pump::Finished,
        Err(_) => Pump::WriterClosed,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn exited_1(stderr: &str) -> TargetError {
        failure("pg_dump", ExitStatus::from_raw(1 << 8), stderr)
    }

    #[test]
    fn a_lost_or_refused_connection_is_retryable_and_bad_input_is_not() {
        let transient = [
            // pg_dump's COPY cut off by a dropped TLS connection (seen in tests/postgres.rs).
            "pg_dump: error: Dumping the contents of table \"noise\" failed: PQgetCopyData() \
             failed.\npg_dump: detail: Error message from server: SSL SYSCALL error: EOF detected",
            "pg_dump: error: connection to server at \"db\" (10.0.0.5), port 5432 failed: \
             Connection refused",
            "pg_dump: error: query failed: server closed the connection unexpectedly",
            "pg_restore: error: could not receive data from server: Connection reset by peer",
            "pg_dump: error: query failed: FATAL: terminating connection due to administrator command",
        ];
        for stderr in transient {
            let err = exited_1(stderr);
            assert!(err.retryable(), "{err}");
        }
        let permanent = [
            "pg_dump: error: no matching schemas were found for pattern \"nope\"",
            "pg_dump: error: query failed: ERROR: permission denied for table secrets",
            "pg_dump: error: server version: 17.2; pg_dump version: 15.19\n\
             pg_dump: error: aborting because of server version mismatch",
        ];
        for stderr in permanent {
            let err = exited_1(stderr);
            assert!(!err.retryable(), "{err}");
        }
        let killed = failure("pg_dump", ExitStatus::from_raw(9), "");
        assert!(killed.retryable(), "{killed}");
        assert!(
            killed.to_string().contains("killed by signal 9"),
            "{killed}"
        );
    }
}
