//! Property-based fuzzing of every parser of outside bytes: no input panics, every failure is
//! an error value, nothing allocates beyond its cap, and no archive writes outside its
//! restore directory. Each property runs
//! `PROPTEST_CASES` inputs (2,000 by default in the test suite; the reliability campaign runs
//! `PROPTEST_CASES=1000000 cargo test --release --lib fuzz::`).

use std::io::Read;

use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::messaging::command::Command;
use crate::pipeline::Inspect;
use crate::storage::manifest::Manifest;
use crate::targets::postgres::archive::ArchiveCounter;
use crate::targets::redis::format::{KeysDecoder, RdbCheck};
use crate::targets::redis::payload::PayloadReader;
use crate::targets::redis::replication::SyncPayload;

fn config() -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(2_000),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A valid manifest as the worker writes it.
const MANIFEST: &str = r#"{"format":1,"id":"20261204T083306Z-postgres-dfgbe6","set_id":null,"target":"postgres","command_id":null,"requested_by":"cli","reason":null,"started_at":"2026-12-04T08:33:06.756236426Z","finished_at":"2026-12-04T08:33:07.044434698Z","retain_until":null,"parent":null,"scope":"full","tool":{"name":"crm-backup","version":"0.1.0"},"source":{"server_version":"15.20 (Debian 15.20-0+deb12u1)","pg_dump_version":"pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)","database":"postgres","schemas":["public"],"requested_schemas":[],"excluded_schemas":[],"tables":[],"row_count_source":"archive","table_count":0,"row_count":0,"large_objects":0,"snapshot":"00000002-000003B2-1","globals":false},"artifacts":[{"name":"postgres.dump","key":"postgres/20261204T083306Z-postgres-dfgbe6/postgres.dump.zst.age","format":"pg_dump-custom","raw_size":1083,"raw_sha256":"e7806a2ea6b5446f472821871140d6df5849a3a8c6a9bd2d9ee9fcaa0af90886","stored_size":723,"stored_sha256":"290bcf72ca39d9b670d084f08882eaf9148f943a01d3ca191c7281ee89ad212f","compression":{"algorithm":"zstd","level":3},"encryption":{"algorithm":"age-x25519","recipients":["sha256:a8ea234ca735a6c4"]}}]}"#;

/// A valid command.
const COMMAND: &str = r#"{"version":1,"id":"3c0e1f7e-2d0b-4c83-9a53-0a6f4f0e8b11","action":"restore","target":"postgres","backup_id":"20261126T023000Z-postgres-k3f9m2","options":{"into":"crm_check","no_owner":true},"requested_by":"ops","reason":"check"}"#;

/// `base` with some bytes replaced, removed or inserted.
fn mutated(base: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..12).prop_map(move |edits| {
        let mut bytes = base.as_bytes().to_vec();
        for (at, byte, how) in edits {
            let at = at % (bytes.len() + 1);
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, byte),
            }
        }
        bytes
    })
}

/// Random bytes, or random bytes after a valid prefix (so that parsers get past their magic).
fn after(prefix: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), 0..4096)).prop_map(move |(keep, tail)| {
        let mut bytes = if keep { prefix.to_vec() } else { Vec::new() };
        bytes.extend(tail);
        bytes
    })
}

/// `bytes` cut into pieces at the given points.
fn pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for to in points.into_iter().chain([bytes.len()]) {
        out.push(bytes[from..to].to_vec());
        from = to;
    }
    out
}

/// `inspector` after it was shown `bytes` in the pieces `cuts` make.
fn shown_in_pieces<I: Inspect>(mut inspector: I, bytes: &[u8], cuts: &[usize]) -> I {
    for piece in pieces(bytes, cuts) {
        inspector.inspect(&piece);
    }
    inspector
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn commands_parse_or_fail_as_errors(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Command::parse(&body);
    }

    #[test]
    fn mutated_commands_parse_or_fail_as_errors(body in mutated(COMMAND)) {
        if let Ok(command) = Command::parse(&body) {
            // What parses is valid: it serializes and parses again to the same command.
            prop_assert_eq!(Command::parse(&command.to_json()).ok(), Some(command));
        }
    }

    #[test]
    fn mutated_manifests_read_or_fail_as_errors(body in mutated(MANIFEST)) {
        let _ = serde_json::from_slice::<Manifest>(&body);
    }

    #[test]
    fn rdb_checks_end_in_a_verdict(
        bytes in after(b"REDIS0010"),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = shown_in_pieces(RdbCheck::default(), &bytes, &cuts).finish();
    }

    #[test]
    fn key_streams_decode_or_fail_within_their_caps(
        bytes in after(b"CRMBKEYS\x01"),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut decoder = KeysDecoder::default();
        for piece in pieces(&bytes, &cuts) {
            decoder.feed(&piece);
            // Every record takes bytes, so more calls than bytes fed never return records.
            let mut ended = false;
            for _ in 0..=bytes.len() {
                match decoder.next() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        ended = true;
                        break;
                    }
                }
            }
            prop_assert!(ended, "the decoder returned records without taking bytes");
        }
    }

    #[test]
    fn pg_dump_archives_are_counted_or_refused(
        bytes in after(b"PGDMP\x01\x0e\x00\x04\x08\x01\x01"),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = shown_in_pieces(ArchiveCounter::default(), &bytes, &cuts).finish();
    }

    #[test]
    fn consul_and_rabbitmq_exports_parse_or_fail_as_errors(
        body in prop::collection::vec(any::<u8>(), 0..1024),
        json in mutated(r#"[{"key":"crm/a","flags":0,"value":"dmFsdWU="}]"#),
        definitions in mutated(r#"{"vhosts":[{"name":"/"}],"queues":[],"users":[]}"#),
    ) {
        let _ = crate::targets::consul::parse_kv(&body);
        let _ = crate::targets::consul::parse_kv(&json);
        let _ = crate::targets::rabbitmq::parse_definitions(&body);
        let _ = crate::targets::rabbitmq::parse_definitions(&definitions);
    }

    /// The replication payload framing returns exactly the RDB, whatever the read sizes, and
    /// a stream cut short is an error, never a shorter RDB.
    #[test]
    fn sync_payloads_end_exactly_at_their_end(
        rdb in prop::collection::vec(any::<u8>(), 0..20_000),
        mark in prop::collection::vec(any::<u8>(), 40),
        piece in 1usize..9000,
        buffer in 1usize..70_000,
        cut in any::<usize>(),
        diskless in any::<bool>(),
    ) {
        let (payload, mut stream) = if diskless {
            let mut stream = rdb.clone();
            stream.extend_from_slice(&mark);
            (SyncPayload::UntilMark(mark.clone()), stream)
        } else {
            (SyncPayload::Length(rdb.len() as u64), rdb.clone())
        };
        prop_assume!(!diskless || !rdb.windows(40).any(|w| w == mark.as_slice()));
        let read = |stream: Vec<u8>| {
            let mut reader = PayloadReader::new(payload.clone(), Trickle { data: stream, at: 0, piece });
            let mut out = Vec::new();
            let mut chunk = vec![0u8; buffer];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => return Ok(out),
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                    Err(err) => return Err(err),
                }
            }
        };
        prop_assert_eq!(read(stream.clone()).ok(), Some(rdb.clone()));
        let cut = cut % stream.len().max(1);
        stream.truncate(cut);
        if cut < rdb.len() + if diskless { mark.len() } else { 0 } {
            prop_assert!(read(stream).is_err());
        }
    }
}

/// Hands out its data `piece` bytes at a time.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    piece: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Entry names an attacker would try, and ordinary ones.
const NAMES: [&str; 10] = [
    "docs/a.txt",
    "docs",
    "../escape",
    "/etc/escape",
    "docs/../../escape",
    "./docs/b.txt",
    "docs//c",
    "link",
    "link/through",
    "",
];

/// A tar of entries with any of [`NAMES`], kinds and link targets, its bytes then edited.
fn hostile_tar() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        0..NAMES.len(),
        0u8..3,
        0..NAMES.len(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    (
        prop::collection::vec(entry, 0..6),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(entries, edits)| {
            let mut builder = tar::Builder::new(Vec::new());
            for (name, kind, target, body) in entries {
                let mut header = tar::Header::new_old();
                let name = NAMES[name].as_bytes();
                header.as_old_mut().name[..name.len()].copy_from_slice(name);
                header.set_mode(0o644);
                match kind {
                    0 => header.set_entry_type(tar::EntryType::Regular),
                    1 => header.set_entry_type(tar::EntryType::Directory),
                    _ => {
                        header.set_entry_type(tar::EntryType::Symlink);
                        let target = NAMES[target].as_bytes();
                        header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
                    }
                }
                let body = if kind == 0 { body } else { Vec::new() };
                header.set_size(body.len() as u64);
                header.set_cksum();
                builder.append(&header, body.as_slice()).expect("in memory");
            }
            let mut bytes = builder.into_inner().expect("in memory");
            for (at, byte) in edits {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = byte;
                }
            }
            bytes
        })
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a documents archive holds, unpacking writes nothing outside its directory.
    #[test]
    fn hostile_archives_never_write_outside_the_restore_directory(archive in hostile_tar()) {
        let parent = tempfile::tempdir().expect("tempdir");
        let dest = parent.path().join("restore");
        std::fs::create_dir(&dest).expect("dest");
        let _ = crate::targets::documents::extract::unpack(archive.as_slice(), &dest, &|_, _| true);
        let beside: Vec<_> = std::fs::read_dir(parent.path())
            .expect("listing")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        prop_assert_eq!(beside, vec![std::ffi::OsString::from("restore")]);
        prop_assert!(!std::path::Path::new("/etc/escape").exists());
    }

    /// Index and entry paths: what is accepted stays below the directory it is joined to.
    #[test]
    fn accepted_paths_stay_inside(name in "[a-z./]{0,24}") {
        if let Ok(path) = crate::targets::documents::extract::safe_relative(&name) {
            prop_assert!(path.is_relative(), "{name}: {}", path.display());
            prop_assert!(
                path.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "{name}: {}", path.display()
            );
        }
    }
}
