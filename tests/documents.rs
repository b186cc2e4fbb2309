//! Documents: tar stream with a per-file index, incremental chains, safe restores.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Store, TestSetup};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::drill::{DrillRequest, run_drill};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog::BackupRef;
use crm_backup::storage::manifest::Manifest;
use crm_backup::targets::documents::DocumentsFacts;
use crm_backup::targets::documents::extract::unpack;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Every entry below `root`: type, mode, mtime, and content digest or link target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let description = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!(
                    "dir {:o} {}.{}",
                    meta.mode() & 0o7777,
                    meta.mtime(),
                    meta.mtime_nsec()
                )
            } else if meta.is_file() {
                let mut hasher = Sha256::new();
                std::io::copy(&mut fs::File::open(&path).unwrap(), &mut hasher).unwrap();
                format!(
                    "file {:o} {} {}.{} {}",
                    meta.mode() & 0o7777,
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    hex::encode(hasher.finalize())
                )
            } else {
                continue; // special files are not part of the tree that is restored
            };
            out.insert(relative, description);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_tree(restored: &Path, original: &BTreeMap<String, String>) {
    let actual = snapshot(restored);
    let differing: Vec<String> = original
        .keys()
        .chain(actual.keys())
        .filter(|k| actual.get(*k) != original.get(*k))
        .map(|k| {
            format!(
                "{k}: restored {:?}, expected {:?}",
                actual.get(k),
                original.get(k)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "trees differ:\n{}",
        differing.join("\n")
    );
}

fn write(path: &Path, content: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with what a document store holds, and what it should not.
fn build_tree(root: &Path) {
    write(
        &root.join("contracts/2026/договор №42.pdf"),
        "содержимое".as_bytes(),
        0o640,
    );
    write(
        &root.join("contracts/2026/客户合同.txt"),
        "合同".as_bytes(),
        0o600,
    );
    let long_dir = "d".repeat(120);
    let long_name = format!("{}.txt", "n".repeat(200));
    write(&root.join(&long_dir).join(&long_name), b"long names", 0o644);
    write(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&root.join("readonly.txt"), b"do not touch", 0o444);
    write(
        &root.join("binary.bin"),
        &(0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
        0o644,
    );
    fs::create_dir_all(root.join("empty/dir")).unwrap();
    symlink("contracts/2026", root.join("latest")).unwrap();
    symlink("../readonly.txt", root.join("bin/readme")).unwrap();
    symlink("missing-target", root.join("dangling")).unwrap();
    symlink("/etc/passwd", root.join("escape-absolute")).unwrap();
    symlink("../../outside", root.join("bin/escape-relative")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    filetime::set_file_mtime(
        root.join("readonly.txt"),
        filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789),
    )
    .unwrap();
}

fn setup(root: &Path) -> TestSetup {
    let root = root.display().to_string();
    TestSetup::new(
        "postgres",
        Store::Local,
        &[
            ("DOCUMENTS_STORAGE_ROOT", root.as_str()),
            ("BACKUP__DOCUMENTS__ENABLED", "true"),
        ],
    )
}

async fn backup(setup: &TestSetup, options: serde_json::Value) -> (Manifest, DocumentsFacts) {
    let mut request = BackupRequest::new(TargetKind::Documents, "test");
    request.options = options;
    let manifest = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .expect("documents backup");
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
async fn a_tree_round_trips_with_names_modes_times_and_links() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    build_tree(&root);
    // A 1 GiB sparse file: streamed, never held in memory.
    let big = fs::File::create(root.join("big.img")).unwrap();
    big.set_len(1 << 30).unwrap();
    drop(big);
    let setup = setup(&root);
    let (manifest, facts) = backup(&setup, json!(null)).await;

    let skipped: BTreeMap<&str, &str> = facts
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert!(skipped["pipe"].contains("FIFO"), "{skipped:?}");
    assert!(
        skipped["escape-absolute"].contains("absolute"),
        "{skipped:?}"
    );
    assert!(
        skipped["bin/escape-relative"].contains("leaves"),
        "{skipped:?}"
    );
    assert_eq!(facts.symlinks, 3);
    assert!(facts.total_bytes > 1 << 30);
    assert!(facts.changed_during_backup.is_empty());
    let entry = facts
        .index
        .iter()
        .find(|e| e.path == "readonly.txt")
        .unwrap();
    assert_eq!(
        (entry.mode, entry.mtime, entry.mtime_nanos),
        (0o444, 1_600_000_000, 123_456_789)
    );
    assert_eq!(
        entry.sha256.as_deref(),
        Some(hex::encode(Sha256::digest(b"do not touch")).as_str())
    );
    assert!(
        manifest.artifacts[0].stored_size < 10 << 20,
        "zeros compress"
    );

    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(
        report.artifacts[0]
            .detail
            .contains("file hashes recomputed")
    );

    // What is expected back: the tree minus what was skipped.
    let mut expected = snapshot(&root);
    for path in ["escape-absolute", "bin/escape-relative"] {
        expected.remove(path);
    }
    let dest = work.path().join("restored");
    let details = restore(&setup, &manifest, json!({ "to": dest }))
        .await
        .unwrap();
    assert_eq!(details["files"], facts.files);
    assert_same_tree(&dest, &expected);

    // Restored again into the same directory, as the redelivery of a restore killed after its
    // tree took its name (before the command was marked done) does: the directory already is
    // this backup, so the restore reports it restored and touches nothing.
    let again = restore(&setup, &manifest, json!({ "to": dest }))
        .await
        .unwrap();
    assert_eq!(again["already_restored"], true, "{again}");
    assert_same_tree(&dest, &expected);

    // A destination that differs in anything (one byte of one file, the size unchanged; or one
    // more file) is refused and left alone.
    let (path, _) = expected
        .iter()
        .find(|(_, what)| what.starts_with("file") && what.split(' ').nth(2) != Some("0"))
        .unwrap();
    for change in ["flip a byte", "add a file"] {
        let other = work
            .path()
            .join(format!("restored-then-{}", change.replace(' ', "-")));
        restore(&setup, &manifest, json!({ "to": other }))
            .await
            .unwrap();
        if change == "flip a byte" {
            let mut bytes = fs::read(other.join(path)).unwrap();
            bytes[0] ^= 1;
            fs::write(other.join(path), &bytes).unwrap();
        } else {
            fs::write(other.join("one-more"), b"").unwrap();
        }
        let changed = snapshot(&other);
        let err = restore(&setup, &manifest, json!({ "to": other }))
            .await
            .unwrap_err();
        assert!(err.contains("not empty"), "{change}: {err}");
        assert_same_tree(&other, &changed);
    }

    // What a restore killed mid-way leaves: the empty destination it created and its
    // partly filled staging directory. The redelivered command restores all the same.
    let again = work.path().join("again");
    fs::create_dir_all(work.path().join("again.restoring/half")).unwrap();
    fs::write(work.path().join("again.restoring/half/copied"), b"partial").unwrap();
    fs::create_dir(&again).unwrap();
    restore(&setup, &manifest, json!({ "to": again }))
        .await
        .unwrap();
    assert_same_tree(&again, &expected);
    assert!(!work.path().join("again.restoring").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_chain_of_three_restores_each_state() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    write(&root.join("a.txt"), b"version 1", 0o644);
    write(&root.join("b.txt"), b"to be deleted", 0o644);
    write(&root.join("dir/c.txt"), b"stays", 0o644);
    let setup = setup(&root);
    let (full, full_facts) = backup(&setup, json!({ "incremental": true })).await;
    assert!(
        !full_facts.incremental,
        "the first backup of a chain is full"
    );
    let state1 = snapshot(&root);

    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&root.join("a.txt"), b"version 2, longer", 0o644);
    fs::remove_file(root.join("b.txt")).unwrap();
    write(&root.join("new/d.txt"), b"added", 0o600);
    let (second, second_facts) = backup(&setup, json!({ "incremental": true })).await;
    assert_eq!(second.parent.as_ref(), Some(&full.id));
    assert_eq!(second_facts.chain, vec![full.id.to_string()]);
    assert_eq!(
        second_facts.stored_files, 2,
        "only a.txt and new/d.txt are stored again"
    );
    assert_eq!(second_facts.deleted, vec!["b.txt"]);
    let state2 = snapshot(&root);

    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&root.join("new/d.txt"), b"changed again", 0o600);
    fs::remove_dir_all(root.join("dir")).unwrap();
    let (third, third_facts) = backup(&setup, json!({ "incremental": true })).await;
    assert_eq!(
        third_facts.chain,
        vec![full.id.to_string(), second.id.to_string()]
    );
    assert_eq!(third_facts.stored_files, 1);
    let state3 = snapshot(&root);

    for (manifest, state) in [(&full, &state1), (&second, &state2), (&third, &state3)] {
        assert!(verify_backup(&setup.ctx, manifest).await.unwrap().ok());
        let dest = work.path().join(format!("restore-{}", manifest.id));
        restore(&setup, manifest, json!({ "to": dest }))
            .await
            .unwrap();
        assert_same_tree(&dest, state);
    }

    // The newest backup corrupt: no file of the chain's older backups reaches the
    // destination either (an empty directory whose mtime would show any entry made).
    let newest = setup.storage_path().join(&third.artifacts[0].key);
    let mut bytes = fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&newest, bytes).unwrap();
    let dest = work.path().join("restore-corrupt");
    fs::create_dir(&dest).unwrap();
    let long_ago = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    filetime::set_file_mtime(&dest, long_ago).unwrap();
    let err = restore(&setup, &third, json!({ "to": dest }))
        .await
        .unwrap_err();
    assert!(err.contains("stored SHA-256"), "{err}");
    let mtime = filetime::FileTime::from_last_modification_time(&fs::metadata(&dest).unwrap());
    assert_eq!(
        mtime, long_ago,
        "something was written into the destination"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changing_during_the_backup_is_reported() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    write(&root.join("growing.log"), &vec![b'x'; 64 << 20], 0o644);
    write(&root.join("stable.txt"), b"stable", 0o644);
    let setup = setup(&root);
    let stop = Arc::new(AtomicBool::new(false));
    let appender = std::thread::spawn({
        let stop = stop.clone();
        let path = root.join("growing.log");
        move || {
            use std::io::Write;
            let mut file = fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(Ordering::SeqCst) {
                file.write_all(b"appended line\n").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    });
    let (manifest, facts) = backup(&setup, json!(null)).await;
    stop.store(true, Ordering::SeqCst);
    appender.join().unwrap();
    assert_eq!(facts.changed_during_backup, vec!["growing.log"]);
    // What was stored is consistent with its own index.
    assert!(verify_backup(&setup.ctx, &manifest).await.unwrap().ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_restore_swaps_and_keeps_the_replaced_tree() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    write(&root.join("a.txt"), b"original", 0o644);
    let setup = setup(&root);
    let (manifest, _) = backup(&setup, json!(null)).await;
    let original = snapshot(&root);
    write(&root.join("a.txt"), b"damaged", 0o644);
    write(&root.join("junk.txt"), b"junk", 0o644);
    let details = restore(&setup, &manifest, json!({ "in_place": true }))
        .await
        .unwrap();
    assert_same_tree(&root, &original);
    let previous = PathBuf::from(details["previous_directory"].as_str().unwrap());
    assert_eq!(fs::read(previous.join("junk.txt")).unwrap(), b"junk");
    let replaced = || {
        fs::read_dir(work.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("documents.replaced-")
            })
            .count()
    };

    // Redelivered after it finished (the worker killed before the command was marked done):
    // the root already is the backup, so nothing moves again.
    let details = restore(&setup, &manifest, json!({ "in_place": true }))
        .await
        .unwrap();
    assert_eq!(details["already_restored"], true, "{details}");
    assert_same_tree(&root, &original);
    assert_eq!(replaced(), 1);

    // Killed between moving the old root aside and moving the restored tree in: the
    // redelivery finds the restored tree under its name beside the root and moves it in.
    let restored = work
        .path()
        .join(format!("documents.restore-{}", manifest.id));
    fs::rename(&root, &restored).unwrap();
    let details = restore(&setup, &manifest, json!({ "in_place": true }))
        .await
        .unwrap();
    assert_eq!(details["already_restored"], true, "{details}");
    assert_same_tree(&root, &original);
    assert!(!restored.exists());
    assert_eq!(replaced(), 1);

    let err = restore(
        &setup,
        &manifest,
        json!({ "to": "/tmp/x", "in_place": true }),
    )
    .await
    .unwrap_err();
    assert!(err.contains("exclude each other"), "{err}");
}

/// One hand-made entry: name, type, content, link target — written byte for byte.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a [u8]>);

/// A tar of raw entries (no path sanitising, as an attacker would write it).
fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn malicious_archives_are_refused_with_nothing_written_outside() {
    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            raw_tar(&[(b"../evil.txt", Regular, b"pwned", None)]),
            "`..`",
        ),
        (
            "nested traversal",
            raw_tar(&[(b"ok/../../evil.txt", Regular, b"pwned", None)]),
            "`..`",
        ),
        (
            "absolute",
            raw_tar(&[(b"/tmp/crm-backup-evil.txt", Regular, b"pwned", None)]),
            "absolute",
        ),
        (
            "escaping symlink",
            raw_tar(&[(b"link", Symlink, b"", Some(b"../outside"))]),
            "leaves",
        ),
        (
            "absolute symlink",
            raw_tar(&[(b"link", Symlink, b"", Some(b"/etc"))]),
            "absolute",
        ),
        (
            "write through a symlink",
            raw_tar(&[
                (b"inner", Directory, b"", None),
                (b"link", Symlink, b"", Some(b"inner")),
                (b"link/x.txt", Regular, b"through the link", None),
            ]),
            "not a directory",
        ),
        ("device", raw_tar(&[(b"dev", Char, b"", None)]), "device"),
        (
            "block device",
            raw_tar(&[(b"blk", Block, b"", None)]),
            "device",
        ),
        ("fifo", raw_tar(&[(b"fifo", Fifo, b"", None)]), "FIFO"),
        (
            "hard link",
            raw_tar(&[(b"hard", Link, b"", Some(b"/etc/passwd"))]),
            "hard link",
        ),
    ];
    for (name, archive, expected) in cases {
        let sandbox = tempfile::tempdir().unwrap();
        let dest = sandbox.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let result = unpack(archive.as_slice(), &dest, &|_, _| true);
        let err = result.err().unwrap_or_else(|| panic!("{name}: accepted"));
        assert!(err.to_string().contains(expected), "{name}: {err}");
        let outside: Vec<_> = fs::read_dir(sandbox.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            outside,
            vec![std::ffi::OsString::from("dest")],
            "{name}: wrote outside"
        );
        assert!(!Path::new("/tmp/crm-backup-evil.txt").exists());
        assert!(
            !dest.join("inner/x.txt").exists(),
            "{name}: wrote through a link"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_a_scratch_copy_beside_the_tree_and_removes_it() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    build_tree(&root);
    let setup = setup(&root);
    let (manifest, facts) = backup(&setup, json!(null)).await;
    let original = snapshot(&root);
    let request = DrillRequest {
        target: TargetKind::Documents,
        backup: BackupRef::Id(manifest.id.clone()),
    };
    // What a drill killed mid-way leaves: a partial scratch copy.
    fs::create_dir_all(work.path().join("documents.drill/half")).unwrap();
    fs::write(work.path().join("documents.drill/half/copied"), b"partial").unwrap();
    let (_, report) = run_drill(&setup.ctx, &request).await.expect("drill passes");
    assert!(
        report.scratch.contains("documents.drill"),
        "{}",
        report.scratch
    );
    assert_eq!(report.details["files"], json!(facts.files));
    let left: Vec<_> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["documents".to_string()],
        "the scratch copy is removed, and what an interrupted drill left"
    );
    assert_same_tree(&root, &original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_writes_only_below_the_restore_root_and_outside_the_live_tree() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    write(&root.join("a.txt"), b"original", 0o644);
    let setup = setup(&root);
    let (manifest, _) = backup(&setup, json!(null)).await;
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), work.path().join("link")).unwrap();
    let cases = [
        (
            elsewhere.path().join("restored"),
            "not below the restore root",
        ),
        (work.path().join("link/restored"), "is a symlink"),
        (root.join("inside"), "inside the live document tree"),
        (work.path().join("x/../../escape"), "`..`"),
    ];
    for (to, says) in cases {
        let err = restore(&setup, &manifest, json!({ "to": to }))
            .await
            .unwrap_err();
        assert!(err.contains(says), "{}: {err}", to.display());
        assert!(!to.exists(), "{} created", to.display());
    }
    assert!(
        fs::read_dir(elsewhere.path()).unwrap().next().is_none(),
        "nothing written elsewhere"
    );
    assert_eq!(snapshot(&root).len(), 1, "the live tree is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_paths_from_a_tampered_manifest_change_nothing_outside() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("documents");
    write(&root.join("a.txt"), b"original", 0o644);
    let setup = setup(&root);
    let (manifest, _) = backup(&setup, json!(null)).await;
    let outside = work.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let before = fs::metadata(&outside).unwrap();
    for path in [outside.display().to_string(), "../outside".to_string()] {
        common::rewrite_facts(&setup, &manifest, |facts| {
            let index = facts["index"].as_array_mut().unwrap();
            index.push(json!({
                "path": path, "type": "dir", "size": 0, "mode": 0o777,
                "mtime": 0, "mtime_nanos": 0
            }));
        })
        .await;
        let to = work.path().join(format!("restored-{}", path.len()));
        let err = restore(&setup, &manifest, json!({ "to": to }))
            .await
            .unwrap_err();
        assert!(
            err.contains("absolute path") || err.contains("leaves the destination"),
            "{path}: {err}"
        );
    }
    let after = fs::metadata(&outside).unwrap();
    assert_eq!(after.permissions().mode() & 0o777, 0o755, "mode unchanged");
    assert_eq!(
        after.modified().unwrap(),
        before.modified().unwrap(),
        "mtime unchanged"
    );
}
