//! A private `redis-server` on a Unix socket that loads an RDB, for live restores and drills.
//! An RDB newer than the server reads is refused before it starts, naming both versions; the
//! server gets as long to load as the RDB's size needs (`redis.load_limit_base` plus
//! `redis.load_limit_per_gib`), and when it gives up, the error carries the server's own last
//! log lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{Address, Endpoint, connect};
use crate::targets::TargetError;

/// The server's log, in its directory.
const LOG: &str = "redis.log";
/// How much of the log's end an error quotes.
const LOG_TAIL: u64 = 2048;

/// Which server reads RDBs back, and how long it may take.
#[derive(Debug, Clone)]
pub(super) struct Scratch {
    pub binary: PathBuf,
    pub load_limit_base: Duration,
    pub load_limit_per_gib: Duration,
}

impl Scratch {
    pub fn of(redis: &crate::config::RedisSettings) -> Self {
        Scratch {
            binary: redis.server_binary.clone(),
            load_limit_base: redis.load_limit_base.0,
            load_limit_per_gib: redis.load_limit_per_gib.0,
        }
    }
}

pub(super) struct ScratchServer {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
    load_limit: Duration,
}

/// How long a server may take to load an RDB of `bytes`: `base`, plus `per_gib` for each GiB
/// begun (loading runs at hundreds of MB/s; the defaults, 2 minutes and 1 minute, leave room
/// for a slow disk).
pub(super) fn load_limit(bytes: u64, base: Duration, per_gib: Duration) -> Duration {
    let gibs = u32::try_from(bytes.div_ceil(1 << 30)).unwrap_or(u32::MAX);
    base.saturating_add(per_gib.saturating_mul(gibs))
}

/// The newest RDB version a `redis-server --version` line's server reads, for the releases
/// whose RDB version is known (`None` for others: the server then says for itself).
pub(super) fn reads_rdb_up_to(version_line: &str) -> Option<(String, u32)> {
    let version = version_line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("v="))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next()??, parts.next()??);
    let rdb = match (major, minor) {
        (2, _) | (3, 0) => 6,
        (3, _) => 7,
        (4, _) => 8,
        (5, _) | (6, _) => 9,
        (7, 0 | 1) => 10,
        (7, 2 | 3) => 11,
        (7, 4) => 12,
        _ => return None,
    };
    Some((version.to_string(), rdb))
}

/// The version in an RDB file's header (`REDIS0012` → 12).
fn rdb_version(rdb: &Path) -> Option<u32> {
    use std::io::Read;
    let mut header = [0u8; 9];
    std::fs::File::open(rdb)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    std::str::from_utf8(header.strip_prefix(b"REDIS")?)
        .ok()?
        .parse()
        .ok()
}

/// Refuses an RDB newer than `binary` reads, naming both, when both versions are known.
async fn check_versions(binary: &Path, rdb: &Path) -> Result<(), TargetError> {
    let Some(written) = rdb_version(rdb) else {
        return Ok(());
    };
    let Ok(output) = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
    else {
        return Ok(()); // starting it fails next, with its own error
    };
    let line = String::from_utf8_lossy(&output.stdout);
    match reads_rdb_up_to(&line) {
        Some((server, newest)) if written > newest => Err(TargetError::Tool {
            tool: "redis-server".into(),
            message: format!(
                "the backup's RDB is version {written}, and {} (Redis {server}) reads RDB \
                 versions up to {newest}: point redis.server_binary at a redis-server at least \
                 as new as the Redis the backup came from",
                binary.display()
            ),
            retryable: false,
        }),
        _ => Ok(()),
    }
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
    /// Starts the scratch binary on `dir/dump.rdb`, listening only on a socket in `dir`.
    pub(super) async fn start(scratch: &Scratch, dir: &Path) -> Result<Self, TargetError> {
        let binary = scratch.binary.as_path();
        let rdb = dir.join("dump.rdb");
        check_versions(binary, &rdb).await?;
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
        let rdb_bytes = std::fs::metadata(&rdb).map_or(0, |m| m.len());
        Ok(ScratchServer {
            child,
            socket,
            log: dir.join(LOG),
            load_limit: load_limit(
                rdb_bytes,
                scratch.load_limit_base,
                scratch.load_limit_per_gib,
            ),
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

    fn settings() -> Scratch {
        let env = [("BACKUP_CONFIG_DIR".to_string(), "/nonexistent".to_string())];
        Scratch::of(
            &crate::config::Settings::load(&env.into_iter().collect())
                .expect("defaults load")
                .redis,
        )
    }

    #[test]
    fn the_load_limit_grows_with_the_rdb() {
        let (base, per_gib) = (Duration::from_secs(120), Duration::from_secs(60));
        assert_eq!(load_limit(0, base, per_gib), Duration::from_secs(120));
        assert_eq!(load_limit(1, base, per_gib), Duration::from_secs(180));
        assert_eq!(
            load_limit(10 << 30, base, per_gib),
            Duration::from_secs(720)
        );
        assert_eq!(
            load_limit(u64::MAX, base, Duration::MAX),
            Duration::MAX,
            "saturates"
        );
        let redis = settings();
        assert_eq!(
            (redis.load_limit_base, redis.load_limit_per_gib),
            (base, per_gib)
        );
    }

    #[test]
    fn the_rdb_versions_a_server_reads_come_from_its_release() {
        let line = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d";
        assert_eq!(reads_rdb_up_to(line), Some(("7.0.15".into(), 10)));
        assert_eq!(
            reads_rdb_up_to("Redis server v=7.2.4 sha=0"),
            Some(("7.2.4".into(), 11))
        );
        assert_eq!(
            reads_rdb_up_to("Redis server v=7.4.1 sha=0"),
            Some(("7.4.1".into(), 12))
        );
        assert_eq!(
            reads_rdb_up_to("Redis server v=6.2.14"),
            Some(("6.2.14".into(), 9))
        );
        assert_eq!(
            reads_rdb_up_to("Redis server v=9.1.0"),
            None,
            "unknown: the server says"
        );
        assert_eq!(reads_rdb_up_to("KeyDB"), None);
    }

    #[tokio::test]
    async fn an_rdb_newer_than_the_server_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        // What Redis 7.4 writes; the test machine's Debian redis-server is 7.0.
        std::fs::write(dir.path().join("dump.rdb"), b"REDIS0012not-an-rdb").unwrap();
        let Err(err) = ScratchServer::start(&settings(), dir.path()).await else {
            panic!("a version 12 RDB was given to redis-server 7.0");
        };
        let err = err.to_string();
        assert!(
            err.contains("RDB is version 12") && err.contains("up to 10") && err.contains("7.0."),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_that_cannot_load_the_rdb_says_why() {
        let dir = tempfile::tempdir().unwrap();
        // An RDB of a version no release is known for: the server's own words tell.
        std::fs::write(dir.path().join("dump.rdb"), b"REDIS0099not-an-rdb").unwrap();
        let mut redis = settings();
        // A wrapper whose version line names no release: the version check stands aside.
        let bin = tempfile::tempdir().unwrap();
        let wrapper = bin.path().join("redis-server");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo unknown; exit 0; fi\nexec redis-server \"$@\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        redis.binary = wrapper;
        let mut server = ScratchServer::start(&redis, dir.path())
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
