//! A private `redis-server` on a Unix socket that loads an RDB, for live restores and drills.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{Address, Endpoint, connect};
use crate::targets::TargetError;

pub(super) struct ScratchServer {
    child: tokio::process::Child,
    socket: PathBuf,
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
        Ok(ScratchServer { child, socket })
    }

    /// The server, once it has loaded the RDB.
    pub(super) async fn loaded(&mut self) -> Result<Endpoint, TargetError> {
        let endpoint = Endpoint {
            address: Address::Unix(self.socket.clone()),
            username: String::new(),
            password: String::new(),
            tls_ca_file: None,
        };
        for _ in 0..1200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TargetError::Tool {
                    tool: "redis-server".into(),
                    message: format!(
                        "exited with {status} while loading the RDB (is it older than the source?)"
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
            message: "did not finish loading the RDB within 2 minutes".into(),
            retryable: false,
        })
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
