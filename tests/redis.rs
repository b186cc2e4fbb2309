//! Redis: RDB over the replication protocol (both payload forms), the keys fallback, live and
//! file restores, existing-key policies — against real redis-server processes.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::fault_proxy::{Direction, Fault, FaultProxy};
use common::{Store, TestSetup};
use crm_backup::jobs::JobError;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::storage::manifest::Manifest;
use crm_backup::targets::redis::RedisFacts;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A redis-server of the test's own, on a free port, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    /// Its command line, for a restart.
    args: Vec<String>,
    /// redis-cli arguments for a TLS server (`--tls --cacert …`), empty for plain TCP.
    cli_tls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::launch(dir, extra, None)
    }

    /// A server that speaks only TLS, with a fresh self-signed certificate; returns it and
    /// the CA file that verifies it.
    fn start_tls() -> (Self, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("redis.crt");
        let key = dir.path().join("redis.key");
        // A CA, and a server certificate for 127.0.0.1 signed by it.
        let script = "set -e
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.crt
            openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout redis.key -out redis.csr
            printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
            openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out redis.crt";
        let status = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success());
        let ca = dir.path().join("ca.crt");
        let server = Self::launch(dir, &[], Some((&cert, &key, &ca)));
        (server, ca)
    }

    fn launch(
        dir: tempfile::TempDir,
        extra: &[&str],
        tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
    ) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut ports = vec!["--port".to_string(), port.to_string()];
        let mut cli_tls = Vec::new();
        if let Some((cert, key, ca)) = tls {
            let (cert, key, ca) = (
                cert.display().to_string(),
                key.display().to_string(),
                ca.display().to_string(),
            );
            ports = [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &cert,
            ]
            .into_iter()
            .chain([
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ])
            .map(String::from)
            .collect();
            cli_tls = vec!["--tls".to_string(), "--cacert".to_string(), ca];
        }
        let mut args = ports;
        args.extend(
            ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                .into_iter()
                .chain(["--enable-debug-command", "yes", "--dir"])
                .map(String::from),
        );
        args.push(dir.path().display().to_string());
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let server = RedisServer {
            child: Self::spawn(&args),
            port,
            args,
            cli_tls,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn spawn(args: &[String]) -> Child {
        Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts")
    }

    fn wait_ready(&self) {
        for _ in 0..200 {
            if self.cli(&["PING"]) == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    /// `SHUTDOWN NOSAVE`, then the same server again: it loads the last `SAVE`.
    fn restart(&mut self) {
        self.cli(&["SHUTDOWN", "NOSAVE"]);
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.args);
        self.wait_ready();
    }

    fn cli_db(&self, db: u32, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(&self.cli_tls)
            .args([
                "--no-raw",
                "-p",
                &self.port.to_string(),
                "-n",
                &db.to_string(),
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_matches('"')
            .to_string()
    }

    fn cli(&self, args: &[&str]) -> String {
        self.cli_db(0, args)
    }

    fn eval(&self, db: u32, script: &str) -> String {
        self.cli_db(db, &["EVAL", script, "0"])
    }

    /// Every key of `db` with a digest of its value (independent of encoding and of
    /// hash-table order) and its TTL in units of 10 s.
    fn contents(&self, db: u32) -> Vec<(String, String, i64)> {
        let out = self.eval(
            db,
            "local out = {} \
             for _, k in ipairs(redis.call('KEYS', '*')) do \
               local t = redis.call('TYPE', k)['ok'] local parts = {t} \
               if t == 'string' then parts[#parts + 1] = redis.call('GET', k) \
               elseif t == 'list' then for _, v in ipairs(redis.call('LRANGE', k, 0, -1)) do parts[#parts + 1] = v end \
               elseif t == 'set' then local m = redis.call('SMEMBERS', k) table.sort(m) \
                 for _, v in ipairs(m) do parts[#parts + 1] = v end \
               elseif t == 'hash' then local h = redis.call('HGETALL', k) local f = {} \
                 for i = 1, #h, 2 do f[#f + 1] = h[i] .. '=' .. h[i + 1] end table.sort(f) \
                 for _, v in ipairs(f) do parts[#parts + 1] = v end \
               elseif t == 'zset' then for _, v in ipairs(redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')) do parts[#parts + 1] = v end \
               elseif t == 'stream' then \
                 for _, e in ipairs(redis.call('XRANGE', k, '-', '+')) do parts[#parts + 1] = e[1] \
                   for _, v in ipairs(e[2]) do parts[#parts + 1] = v end end \
                 for _, g in ipairs(redis.call('XINFO', 'GROUPS', k)) do \
                   for i = 1, #g do parts[#parts + 1] = tostring(g[i]) end end \
               end \
               table.insert(out, k .. ' ' .. redis.sha1hex(table.concat(parts, '|')) .. ' ' .. redis.call('PTTL', k)) \
             end return out",
        );
        let mut rows: Vec<(String, String, i64)> = out
            .lines()
            .filter(|l| !l.is_empty() && !l.contains("(empty"))
            .map(|line| {
                let line = line
                    .split_once(") ")
                    .map_or(line, |(_, rest)| rest)
                    .trim_matches('"');
                let mut parts = line.rsplitn(3, ' ');
                let ttl: i64 = parts.next().unwrap().parse().unwrap();
                let digest = parts.next().unwrap().to_string();
                let key = parts.next().unwrap().to_string();
                (
                    key,
                    digest,
                    if ttl < 0 { ttl } else { (ttl + 500) / 10_000 },
                )
            })
            .collect();
        rows.sort();
        rows
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every type, binary and non-ASCII keys, big values, TTLs, two databases.
fn populate(server: &RedisServer) {
    server.eval(
        0,
        "redis.call('SET', 'fsm:deal:1', 'qualified') \
         redis.call('SET', '\\0bin\\255key', '\\1\\2\\0\\3') \
         redis.call('SET', 'ключ:客户', 'значение') \
         redis.call('SET', 'big', string.rep('x', 3 * 1024 * 1024)) \
         redis.call('SET', 'session:1', 'token', 'PX', 3600000) \
         for i = 1, 20000 do redis.call('RPUSH', 'queue', 'item-' .. i) end \
         for i = 1, 300 do redis.call('HSET', 'deal:1', 'field' .. i, 'value' .. i) end \
         redis.call('HSET', 'small-hash', 'a', '1') \
         for i = 1, 500 do redis.call('SADD', 'tags', 'tag' .. i) end \
         redis.call('SADD', 'ints', 1, 2, 3) \
         for i = 1, 200 do redis.call('ZADD', 'scores', i * 1.5, 'member' .. i) end \
         redis.call('EXPIRE', 'scores', 7200) \
         for i = 1, 50 do redis.call('XADD', 'events', '*', 'kind', 'deal', 'n', tostring(i)) end \
         redis.call('XGROUP', 'CREATE', 'events', 'mailer', '0') \
         redis.call('XREADGROUP', 'GROUP', 'mailer', 'c1', 'COUNT', 5, 'STREAMS', 'events', '>') \
         return 1",
    );
    server.eval(
        3,
        "for i = 1, 1000 do redis.call('SET', 'cache:' .. i, i, 'EX', 86400) end return 1",
    );
}

fn setup_for(server: &RedisServer, extra: &[(&str, &str)]) -> TestSetup {
    setup_on_port(server.port, extra)
}

/// Settings for a Redis on `127.0.0.1:<port>` (a server, or a proxy in front of one).
fn setup_on_port(port: u16, extra: &[(&str, &str)]) -> TestSetup {
    let port = port.to_string();
    let tmp = std::env::temp_dir().display().to_string();
    // The test's other Redis servers listen on 127.0.0.1; RDB files go to temporary
    // directories.
    let mut env = vec![
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", port.as_str()),
        ("BACKUP__RESTORE__ALLOWED_DESTINATIONS", "127.0.0.1"),
        ("BACKUP__RESTORE__ROOT", tmp.as_str()),
    ];
    env.extend_from_slice(extra);
    TestSetup::new("postgres", Store::Local, &env)
}

async fn try_backup(setup: &TestSetup) -> Result<Manifest, JobError> {
    let request = BackupRequest::new(TargetKind::Redis, "test");
    run_backup(&setup.ctx, &request, &CancellationToken::new()).await
}

async fn backup(setup: &TestSetup) -> (Manifest, RedisFacts) {
    let manifest = try_backup(setup).await.expect("redis backup");
    common::assert_manifest_valid(setup, &manifest).await;
    let facts = manifest.source.parse().unwrap();
    (manifest, facts)
}

async fn restore(
    setup: &TestSetup,
    manifest: &Manifest,
    options: serde_json::Value,
) -> Result<serde_json::Value, String> {
    common::restore_details(setup, manifest, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rdb_backup_restores_live_and_to_a_file() {
    let source = RedisServer::start(&[]);
    populate(&source);
    let setup = setup_for(&source, &[]);
    let (manifest, facts) = backup(&setup).await;
    assert_eq!(facts.mode, crm_backup::config::RedisMode::Rdb);
    assert!(facts.rdb_version.unwrap() >= 9);
    assert_eq!(facts.keyspace["db3"].keys, 1000);
    assert_eq!(facts.keyspace["db3"].expires, 1000);
    assert_eq!(facts.key_count, 1012);
    assert!(verify_backup(&setup.ctx, &manifest).await.unwrap().ok());
    // The drill loads the RDB into a private server and counts every database.
    let drilled = common::drill_details(&setup, &manifest).await.unwrap();
    assert_eq!(drilled["keys_per_db"], json!({ "db0": 12, "db3": 1000 }));
    // A manifest that claims more keys than the RDB holds (beyond the 2 that could have
    // expired since) fails the drill.
    common::rewrite_facts(&setup, &manifest, |facts| {
        facts["keyspace"]["db0"]["keys"] = json!(15)
    })
    .await;
    let err = common::drill_details(&setup, &manifest).await.unwrap_err();
    assert!(
        err.contains("db0: 12 keys loaded") && err.contains("recorded 15"),
        "{err}"
    );
    common::recommit(&setup, &manifest).await;

    // Live, onto another running Redis.
    let target = RedisServer::start(&[]);
    let details = restore(
        &setup,
        &manifest,
        json!({ "host": "127.0.0.1", "port": target.port }),
    )
    .await
    .unwrap();
    assert_eq!(details["restored"], 1012);
    for db in [0, 3] {
        assert_eq!(target.contents(db), source.contents(db), "db{db}");
    }
    assert!(
        source
            .contents(0)
            .iter()
            .any(|(k, _, _)| k.contains("\\x00bin\\xffkey")),
        "binary key present"
    );

    // To a file: a redis-server started on it has the same dataset, TTLs included.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dump.rdb");
    restore(&setup, &manifest, json!({ "to_file": file }))
        .await
        .unwrap();
    let from_file = RedisServer::start_in(dir, &["--dbfilename", "dump.rdb"]);
    assert_eq!(
        from_file.cli(&["DEBUG", "DIGEST"]),
        source.cli(&["DEBUG", "DIGEST"])
    );
    // Delivered again (its worker killed before the command was marked done): the file is
    // this backup's RDB, so the restore completes without writing.
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();
    let again = restore(&setup, &manifest, json!({ "to_file": file }))
        .await
        .unwrap();
    assert_eq!(again["already_restored"], true, "{again}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        written
    );

    // Any other file is never overwritten.
    let again = tempfile::tempdir().unwrap();
    let existing = again.path().join("dump.rdb");
    std::fs::write(&existing, b"keep me").unwrap();
    let err = restore(&setup, &manifest, json!({ "to_file": existing }))
        .await
        .unwrap_err();
    assert!(err.contains("exists; restore into a new file"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    // Killed mid-write, an attempt leaves only `<file>.restoring`: the next one replaces it.
    let fresh = again.path().join("fresh.rdb");
    std::fs::write(again.path().join("fresh.rdb.restoring"), b"half an RDB").unwrap();
    restore(&setup, &manifest, json!({ "to_file": fresh }))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&fresh).unwrap(),
        std::fs::read(&file).unwrap()
    );
    assert!(!again.path().join("fresh.rdb.restoring").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_based_sync_payload_works_too() {
    let source = RedisServer::start(&["--repl-diskless-sync", "no"]);
    populate(&source);
    let setup = setup_for(&source, &[]);
    let (manifest, facts) = backup(&setup).await;
    assert!(facts.rdb_version.is_some());
    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.artifacts[0].detail.contains("CRC-64 valid"));
    let target = RedisServer::start(&[]);
    restore(
        &setup,
        &manifest,
        json!({ "host": "127.0.0.1", "port": target.port }),
    )
    .await
    .unwrap();
    assert_eq!(target.contents(0), source.contents(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_sync_is_backed_up_key_by_key() {
    let source = RedisServer::start(&["--rename-command", "SYNC", ""]);
    populate(&source);
    let setup = setup_for(&source, &[]);
    let (manifest, facts) = backup(&setup).await;
    assert_eq!(facts.mode, crm_backup::config::RedisMode::Keys);
    assert!(
        facts
            .fallback_reason
            .as_ref()
            .unwrap()
            .contains("SYNC refused"),
        "{facts:?}"
    );
    assert_eq!(facts.keys_written, Some(1012));
    assert_eq!(manifest.artifacts[0].format, "redis-keys");
    assert_eq!(
        common::drill_details(&setup, &manifest).await.unwrap()["keys"],
        1012
    );
    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(
        report.ok() && report.artifacts[0].detail.contains("1012 keys"),
        "{report:?}"
    );

    let target = RedisServer::start(&[]);
    restore(
        &setup,
        &manifest,
        json!({ "host": "127.0.0.1", "port": target.port }),
    )
    .await
    .unwrap();
    for db in [0, 3] {
        assert_eq!(target.contents(db), source.contents(db), "db{db}");
    }
    let err = restore(&setup, &manifest, json!({ "to_file": "/tmp/never.rdb" }))
        .await
        .unwrap_err();
    assert!(err.contains("restores live only"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_keys_follow_the_chosen_policy() {
    let source = RedisServer::start(&[]);
    source.eval(
        0,
        "redis.call('SET', 'a', 'from-backup') redis.call('SET', 'b', 'from-backup') return 1",
    );
    let setup = setup_for(&source, &[]);
    let (manifest, _) = backup(&setup).await;
    let target = RedisServer::start(&[]);
    let reset = || {
        target.cli(&["FLUSHALL"]);
        target.eval(0, "redis.call('SET', 'a', 'target-own') redis.call('SET', 'extra', 'target-only') return 1");
    };
    let to_target = |existing: Option<&str>| {
        let mut options = json!({ "host": "127.0.0.1", "port": target.port });
        if let Some(policy) = existing {
            options["existing"] = json!(policy);
        }
        options
    };

    reset();
    let err = restore(&setup, &manifest, to_target(None))
        .await
        .unwrap_err();
    assert!(
        err.contains("existing = replace, skip or flush-first"),
        "{err}"
    );
    assert_eq!(
        target.cli(&["GET", "b"]),
        "(nil)",
        "nothing written when refused"
    );

    reset();
    let details = restore(&setup, &manifest, to_target(Some("skip")))
        .await
        .unwrap();
    assert_eq!(
        (
            details["restored"].as_u64(),
            details["skipped_existing"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(target.cli(&["GET", "a"]), "target-own");
    assert_eq!(target.cli(&["GET", "b"]), "from-backup");

    reset();
    restore(&setup, &manifest, to_target(Some("replace")))
        .await
        .unwrap();
    assert_eq!(target.cli(&["GET", "a"]), "from-backup");
    assert_eq!(target.cli(&["GET", "extra"]), "target-only");

    reset();
    restore(&setup, &manifest, to_target(Some("flush-first")))
        .await
        .unwrap();
    assert_eq!(target.cli(&["GET", "a"]), "from-backup");
    assert_eq!(target.cli(&["EXISTS", "extra"]), "(integer) 0");

    let err = restore(&setup, &manifest, json!({})).await.unwrap_err();
    assert!(err.contains("to_file, host"), "{err}");

    // A corrupt backup is found before flush-first flushes anything.
    let path = setup.storage_path().join(&manifest.artifacts[0].key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    reset();
    let err = restore(&setup, &manifest, to_target(Some("flush-first")))
        .await
        .unwrap_err();
    assert!(err.contains("stored SHA-256"), "{err}");
    assert_eq!(
        target.cli(&["GET", "extra"]),
        "target-only",
        "nothing was flushed"
    );
    assert_eq!(target.cli(&["GET", "a"]), "target-own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_a_retryable_error_without_debris() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let setup = setup_on_port(port, &[("REDIS_PASSWORD", "sekrit-pass")]);
    let err = try_backup(&setup).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(!err.to_string().contains("sekrit-pass"));
    assert!(setup.stored_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_stream_cut_mid_rdb_fails_retryably_and_stores_nothing() {
    for diskless in ["yes", "no"] {
        let source = RedisServer::start(&[
            "--repl-diskless-sync",
            diskless,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        populate(&source);
        let proxy = FaultProxy::start(&format!("127.0.0.1:{}", source.port)).await;
        let setup = setup_on_port(proxy.port(), &[]);
        // The RDB is ~167 KB (LZF shrinks the 3 MiB value): cut in its middle.
        proxy.cut_after(Direction::Received, 80_000, Fault::None);

        let err = try_backup(&setup)
            .await
            .expect_err("a truncated RDB is never committed");

        assert_eq!(
            proxy.cuts(),
            1,
            "diskless {diskless}: the proxy cut the stream"
        );
        assert!(err.retryable(), "diskless {diskless}: {err}");
        assert!(
            err.to_string().contains("before the RDB ended"),
            "diskless {diskless}: {err}"
        );
        assert!(
            setup.stored_files().is_empty(),
            "diskless {diskless}: {:?}",
            setup.stored_files()
        );
        // The retry, over the same proxy, gets the whole RDB.
        let (manifest, facts) = backup(&setup).await;
        assert_eq!(facts.mode, crm_backup::config::RedisMode::Rdb);
        assert_eq!(facts.key_count, 1012);
        let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
        assert!(report.ok(), "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_mid_rdb_fails_retryably_and_the_retry_gets_every_key() {
    for diskless in ["yes", "no"] {
        let mut source = RedisServer::start(&[
            "--repl-diskless-sync",
            diskless,
            "--repl-diskless-sync-delay",
            "0",
        ]);
        source.cli(&["DEBUG", "POPULATE", "20000", "key", "64"]);
        source.cli(&["SAVE"]);
        // Each key now takes 200 µs to write: ~4 s of RDB, inside which the server restarts
        // (the restarted one loads the SAVE above, without the delay).
        source.cli(&["CONFIG", "SET", "rdb-key-save-delay", "200"]);
        let setup = setup_for(&source, &[]);

        let (result, ()) = tokio::join!(try_backup(&setup), async {
            let saving = |server: &RedisServer| {
                server
                    .cli(&["INFO", "persistence"])
                    .contains("rdb_bgsave_in_progress:1")
            };
            for _ in 0..400 {
                if saving(&source) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            assert!(
                saving(&source),
                "diskless {diskless}: the RDB never started"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            source.restart();
        });

        let err = result.expect_err("an RDB cut by a restart is never committed");
        // Mid-payload (diskless) or while the server still wrote the RDB to its disk.
        assert!(
            err.to_string().contains("the server closed"),
            "diskless {diskless}: {err}"
        );
        assert!(err.retryable(), "diskless {diskless}: {err}");
        assert!(
            setup.stored_files().is_empty(),
            "diskless {diskless}: {:?}",
            setup.stored_files()
        );
        // The retry, against the restarted server, gets every key.
        let (manifest, facts) = backup(&setup).await;
        assert_eq!(facts.key_count, 20000, "diskless {diskless}");
        let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
        assert!(report.ok(), "diskless {diskless}: {report:?}");
    }
    common::tally::Tally {
        commands: 4,
        ..Default::default()
    }
    .print(
        "Redis restarted mid-RDB (SHUTDOWN NOSAVE), diskless and disk-based",
        "retryable failure, nothing stored; the retry had all 20000 keys and verified",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_redis_is_backed_up_and_restored_over_tls() {
    let (source, ca) = RedisServer::start_tls();
    populate(&source);
    let ca_file = ca.display().to_string();
    let setup = setup_for(
        &source,
        &[
            ("REDIS_TLS", "true"),
            ("BACKUP__REDIS__TLS_CA_FILE", ca_file.as_str()),
        ],
    );
    let (manifest, facts) = backup(&setup).await;
    assert_eq!(facts.mode, crm_backup::config::RedisMode::Rdb);
    assert_eq!(facts.key_count, 1012);

    // Restore onto a plain-TCP Redis, and onto the TLS one itself (flushed first).
    let target = RedisServer::start(&[]);
    restore(
        &setup,
        &manifest,
        json!({ "host": "127.0.0.1", "port": target.port, "tls": false }),
    )
    .await
    .unwrap();
    assert_eq!(target.contents(0), source.contents(0));
    let expected = source.contents(3);
    source.cli(&["FLUSHALL"]);
    restore(
        &setup,
        &manifest,
        json!({ "in_place": true, "existing": "flush-first" }),
    )
    .await
    .unwrap();
    assert_eq!(source.contents(3), expected);

    // A certificate the configured CA does not vouch for is refused.
    let (other, _) = RedisServer::start_tls();
    let untrusted = setup_for(
        &other,
        &[
            ("REDIS_TLS", "true"),
            ("BACKUP__REDIS__TLS_CA_FILE", ca_file.as_str()),
        ],
    );
    let err = try_backup(&untrusted).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert!(!err.retryable(), "{err}");
    assert!(untrusted.stored_files().is_empty());
}

/// A TCP listener that records what its first client sends and answers every line with an
/// error: a host where an attacker would collect credentials.
struct Collector {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Collector {
    fn start() -> Self {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (sink, count) = (received.clone(), accepted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(500)));
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    let _ = stream.write_all(b"-ERR not a Redis\r\n");
                }
            }
        });
        Collector {
            port,
            received,
            accepted,
        }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }

    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_send_neither_data_nor_credentials_where_they_do_not_belong() {
    let source = RedisServer::start(&[]);
    populate(&source);
    let backed_up = setup_for(&source, &[]);
    let (manifest, _) = backup(&backed_up).await;
    let before = source.contents(0);
    let allowed = Collector::start();
    let elsewhere = Collector::start();
    let allowed_destination = format!("127.0.0.1:{}", allowed.port);
    let storage = backed_up.env["BACKUP_STORAGE_DIR"].clone();
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().display().to_string();
    // The worker that restores holds a Redis password, and one allowed destination.
    let setup = setup_for(
        &source,
        &[
            ("BACKUP_STORAGE_DIR", storage.as_str()),
            ("REDIS_PASSWORD", "sekrit-pass"),
            (
                "BACKUP__RESTORE__ALLOWED_DESTINATIONS",
                allowed_destination.as_str(),
            ),
            ("BACKUP__RESTORE__ROOT", root_path.as_str()),
        ],
    );
    let attempt = |options: serde_json::Value| restore(&setup, &manifest, options);

    // A host that is not allowed: refused before anything connects.
    let err = attempt(json!({ "host": "127.0.0.1", "port": elsewhere.port }))
        .await
        .unwrap_err();
    assert!(err.contains("not in restore.allowed_destinations"), "{err}");
    // An allowed host gets the data but never the configured password.
    let _ =
        attempt(json!({ "host": "127.0.0.1", "port": allowed.port, "existing": "replace" })).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(allowed.connections() >= 1);
    assert!(
        !allowed.received().contains("sekrit-pass"),
        "{}",
        allowed.received()
    );
    // Any environment variable as a password: only those listed.
    let err = attempt(json!({
        "host": "127.0.0.1", "port": allowed.port, "password_env": "BACKUP_S3_SECRET_KEY"
    }))
    .await
    .unwrap_err();
    assert!(err.contains("not in restore.password_envs"), "{err}");
    // The configured Redis named as another host, with a destructive policy: that is in place.
    let err = attempt(json!({
        "host": "127.0.0.1", "port": source.port, "existing": "flush-first"
    }))
    .await
    .unwrap_err();
    assert!(err.contains("that is the configured Redis"), "{err}");
    assert_eq!(source.contents(0), before, "the live source is unchanged");
    // Files only below the restore root, through no symlink.
    std::os::unix::fs::symlink("/etc", root.path().join("link")).unwrap();
    for path in [
        "/etc/crm-backup-test.rdb".to_string(),
        format!("{root_path}/link/x.rdb"),
    ] {
        let err = attempt(json!({ "to_file": path })).await.unwrap_err();
        assert!(
            err.contains("restore root") || err.contains("symlink"),
            "{err}"
        );
    }
    assert!(!std::path::Path::new("/etc/crm-backup-test.rdb").exists());
    assert!(!std::path::Path::new("/etc/x.rdb").exists());
    assert_eq!(elsewhere.connections(), 0);
}

/// What a Redis impostor answers to a command.
enum Reply {
    /// These bytes, then the next command.
    More(Vec<u8>),
    /// These bytes, then the connection closed.
    Last(Vec<u8>),
}

/// A Redis impostor on a free port: each command gets what `answer` returns for its name
/// (upper case).
async fn impostor(answer: fn(&str) -> Reply) -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = tokio::io::BufReader::new(read);
                while let Some(name) = read_command(&mut read).await {
                    let (reply, last) = match answer(&name) {
                        Reply::More(bytes) => (bytes, false),
                        Reply::Last(bytes) => (bytes, true),
                    };
                    if write.write_all(&reply).await.is_err() || last {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// The name of the next command a client sends (a RESP array of bulk strings).
async fn read_command(
    read: &mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut line = String::new();
    read.read_line(&mut line).await.ok()?;
    let count: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut name = None;
    for _ in 0..count {
        line.clear();
        read.read_line(&mut line).await.ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut arg = vec![0; len + 2];
        read.read_exact(&mut arg).await.ok()?;
        name.get_or_insert_with(|| String::from_utf8_lossy(&arg[..len]).to_uppercase());
    }
    name
}

/// What a small real server answers to INFO: one database of one key.
fn honest_info() -> Vec<u8> {
    let text = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1000\r\n\
                # Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n";
    format!("${}\r\n{text}\r\n", text.len()).into_bytes()
}

/// A terabyte announced, a few bytes sent, the connection closed.
const TERABYTE_BULK: &[u8] = b"$1099511627776\r\nREDIS0011";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_gets_a_typed_error_never_an_allocation_it_chose() {
    // Each: the impostor's answers, the mode, and what the error must say. Any allocation of
    // an announced length (a terabyte) would abort this test process, as it did the worker.
    type Answer = fn(&str) -> Reply;
    let cases: [(&str, Answer, &str, &str); 6] = [
        (
            "INFO answered with a terabyte bulk string",
            |_| Reply::Last(TERABYTE_BULK.to_vec()),
            "rdb",
            "INFO",
        ),
        (
            "INFO answered with a terabyte-element array",
            |_| Reply::Last(b"*1099511627776\r\n$1\r\nx\r\n".to_vec()),
            "rdb",
            "INFO",
        ),
        (
            "REPLCONF answered with an endless line",
            |name| match name {
                "INFO" => Reply::More(honest_info()),
                _ => Reply::Last(vec![b'+'; 1 << 20]),
            },
            "rdb",
            "a reply line longer than 65536 bytes",
        ),
        (
            "SYNC answered with a terabyte RDB that stops",
            |name| match name {
                "INFO" => Reply::More(honest_info()),
                "SYNC" => Reply::Last(TERABYTE_BULK.to_vec()),
                _ => Reply::More(b"+OK\r\n".to_vec()),
            },
            "rdb",
            "before the RDB ended",
        ),
        (
            "SCAN answered with a terabyte-element key list",
            |name| match name {
                "INFO" => Reply::More(honest_info()),
                "SCAN" => Reply::Last(b"*2\r\n$1\r\n0\r\n*1099511627776\r\n$1\r\nk\r\n".to_vec()),
                _ => Reply::Last(Vec::new()),
            },
            "keys",
            "SCAN",
        ),
        (
            "DUMP answered with a terabyte payload",
            |name| match name {
                "INFO" => Reply::More(honest_info()),
                "SCAN" => Reply::More(b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\nk\r\n".to_vec()),
                "DUMP" => Reply::Last(TERABYTE_BULK.to_vec()),
                _ => Reply::Last(Vec::new()),
            },
            "keys",
            "DUMP",
        ),
    ];
    for (case, answer, mode, says) in cases {
        let port = impostor(answer).await;
        let setup = setup_on_port(port, &[("BACKUP__REDIS__MODE", mode)]);
        let err = tokio::time::timeout(Duration::from_secs(30), try_backup(&setup))
            .await
            .unwrap_or_else(|_| panic!("{case}: the backup hung"))
            .expect_err(case);
        assert!(
            matches!(err, JobError::Target(_)),
            "{case}: a target error, got {err:?}"
        );
        assert!(err.to_string().contains(says), "{case}: {err}");
        assert!(
            setup.stored_files().is_empty(),
            "{case}: {:?}",
            setup.stored_files()
        );
    }
}
