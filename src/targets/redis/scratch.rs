//! A private `redis-server` on a Unix socket that loads an RDB, for live restores and drills.
//! It gets as long to load as the RDB's size needs, and when it gives up, the error carries
//! the server's own last log lines (an RDB newer than the server says which version).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{Address, Endpoint, connect};
use crate::targets::TargetError;

/// The server's log, in its directory.
const LOG: &str = "redis.log";
/// How much of the log's end an error quotes.
const LOG_TAIL: u64 = 2048;

pub(super) struct ScratchServer {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
    load_limit: Duration,
}

/// How long a server may take to load an RDB of `bytes`: two minutes, plus a minute per GiB
/// (loading runs at hundreds of MB/s; this leaves room for a slow disk).
pub(super) fn load_limit(bytes: u64) -> Duration {
    Duration::from_secs(120 + 60 * bytes.div_ceil(1 << 30))
}

/// The last lines of the server's log, at most [`LOG_TAIL`] bytes, on one line.
fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut tail = Vec::new();
    let _ = file.take(LOG_TAIL).read_to_end(&mut tail);
    let text = String::from_utf8_lossy(&tail);
    // Redis's log lines: `pid:role date time level message`; keep the messages of the
    // warnings (`#`), which say why it stopped.
    let messages: Vec<&str> = text
        .lines()
        .filter_map(|line| line.split_once(" # ").map(|(_, message)| message.trim()))
        .filter(|message| !message.starts_with("WARNING"))
        .collect();
    messages.join("; ")
}

impl ScratchServer {
    /// Starts `binary` on `dir/dump.rdb`, listening only on a socket in `dir`.
    pub(super) async fn start(binary: &Path, dir: &Path) -> Result<Self, TargetError> {
        let socket = dir.join("redis.sock");
        let child = tokio::process::Command::new(binary)
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--dbfilename", "dump.rdb"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join(LOG))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| TargetError::Tool {
                tool: "redis-server".into(),
                message: format!(
                    "cannot start {} to read the RDB (redis.server_binary): {err}",
                    binary.display()
                ),
                retryable: false,
            })?;
        let rdb_bytes = std::fs::metadata(dir.join("dump.rdb")).map_or(0, |m| m.len());
        Ok(ScratchServer {
            child,
            socket,
            log: dir.join(LOG),
            load_limit: load_limit(rdb_bytes),
        })
    }

    /// The server, once it has loaded the RDB.
    pub(super) async fn loaded(&mut self) -> Result<Endpoint, TargetError> {
        let endpoint = Endpoint {
            address: Address::Unix(self.socket.clone()),
            username: String::new(),
            password: String::new(),
            tls_ca_file: None,
        };
        let deadline = tokio::time::Instant::now() + self.load_limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TargetError::Tool {
                    tool: "redis-server".into(),
                    message: format!(
                        "exited with {status} while loading the RDB: {} (redis.server_binary \
                         must be at least as new as the source Redis)",
                        or_unknown(log_tail(&self.log))
                    ),
                    retryable: false,
                });
            }
            if let Ok(mut conn) = connect(&endpoint, 0).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(endpoint);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TargetError::Tool {
            tool: "redis-server".into(),
            message: format!(
                "did not finish loading the RDB within {} seconds: {}",
                self.load_limit.as_secs(),
                or_unknown(log_tail(&self.log))
            ),
            retryable: false,
        })
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn or_unknown(text: String) -> String {
    if text.is_empty() {
        "its log says nothing".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_limit_grows_with_the_rdb() {
        assert_eq!(load_limit(0), Duration::from_secs(120));
        assert_eq!(load_limit(1), Duration::from_secs(180));
        assert_eq!(load_limit(10 << 30), Duration::from_secs(720));
    }

    #[tokio::test]
    async fn a_server_that_cannot_load_the_rdb_says_why() {
        let dir = tempfile::tempdir().unwrap();
        // An RDB from a newer Redis than any this server reads.
        std::fs::write(dir.path().join("dump.rdb"), b"REDIS0099not-an-rdb").unwrap();
        let mut server = ScratchServer::start(Path::new("redis-server"), dir.path())
            .await
            .expect("redis-server starts (scripts/test.sh installs it)");
        let Err(err) = server.loaded().await else {
            panic!("an RDB of version 99 loaded");
        };
        let err = err.to_string();
        assert!(
            err.contains("Can't handle RDB format version 99"),
            "the server's own words: {err}"
        );
        assert!(!err.contains("WARNING"), "{err}");
    }
}
