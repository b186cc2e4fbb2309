//! Signed manifests through the real CLI, PostgreSQL and `pg_restore`: a manifest that was
//! changed, whose artifact was swapped (hashes recomputed), that lost its signature or that
//! another key signed is refused by restore, drill and verify before anything reaches
//! `pg_restore`; the stock `minisign` tool checks what the worker signed; keys rotate; a
//! manifest that claims less encryption than the installation uses is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    Store, TestDatabase, TestSetup, age_key, database_exists, minisign_key, psql, run_cli, unique,
};

fn fixture(prefix: &str) -> TestDatabase {
    let db = TestDatabase::create(prefix);
    psql(
        &db.name,
        "CREATE TABLE deals (id int PRIMARY KEY, title text);
         INSERT INTO deals SELECT i, 'deal ' || i FROM generate_series(1, 500) i;",
    );
    db
}

/// Runs a backup through the CLI; returns the stored manifest's path.
fn backup(setup: &TestSetup) -> PathBuf {
    let before = manifests(setup);
    let (ok, stdout, stderr) = run_cli(&setup.env, &["run", "postgres"]);
    assert!(ok, "backup: {stdout}{stderr}");
    let after = manifests(setup);
    let new: Vec<_> = after.into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 1, "one new manifest: {new:?}");
    new[0].clone()
}

fn manifests(setup: &TestSetup) -> Vec<PathBuf> {
    let mut found: Vec<_> = setup
        .stored_files()
        .into_iter()
        .filter(|p| p.file_name().unwrap() == "manifest.json")
        .collect();
    found.sort();
    found
}

fn backup_id(manifest: &Path) -> String {
    read_json(manifest)["id"].as_str().unwrap().to_string()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

fn signature_of(manifest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.minisig", manifest.display()))
}

/// `minisign -Vm <manifest> -P <key>`: whether the stock tool accepts the signature.
fn stock_minisign_verifies(manifest: &Path, public_key: &str) -> bool {
    Command::new("minisign")
        .args(["-V", "-q", "-m"])
        .arg(manifest)
        .args(["-P", public_key])
        .status()
        .expect("minisign is installed (scripts/test.sh installs it)")
        .success()
}

/// Restore, verify and drill of `id`: each must fail naming `expected`; no database appears.
fn assert_refused_everywhere(setup: &TestSetup, id: &str, expected: &str) {
    let into = unique("sig_into");
    let _cleanup = TestDatabase::adopt(&into);
    let (ok, stdout, stderr) = run_cli(
        &setup.env,
        &["restore", "postgres", "--backup", id, "--into", &into],
    );
    assert!(!ok, "restore must be refused: {stdout}");
    assert!(
        stderr.contains(expected),
        "restore names `{expected}`: {stderr}"
    );
    assert!(!database_exists(&into), "nothing reached pg_restore");

    let (ok, stdout, stderr) = run_cli(&setup.env, &["verify", "postgres", "--backup", id]);
    assert!(!ok, "verify must fail: {stdout}");
    assert!(
        stdout.contains("FAIL") && stdout.contains("manifest.json") && stdout.contains(expected),
        "verify reports the manifest: {stdout}{stderr}"
    );

    let (ok, stdout, stderr) = run_cli(&setup.env, &["drill", "postgres", "--backup", id]);
    assert!(!ok, "drill must fail: {stdout}");
    assert!(
        stderr.contains(expected),
        "drill names `{expected}`: {stderr}"
    );
}

#[test]
fn tampered_manifests_are_refused_before_anything_is_restored() {
    let source = fixture("sig_src");
    let other = fixture("sig_other");
    psql(
        &other.name,
        "INSERT INTO deals VALUES (9999, 'planted by the attacker')",
    );
    // The worker's key made by the stock tool, as an operator would: `minisign -G -W`.
    let keys = tempfile::tempdir().unwrap();
    let status = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(keys.path().join("pub.key"))
        .arg("-s")
        .arg(keys.path().join("sec.key"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let public_file = std::fs::read_to_string(keys.path().join("pub.key")).unwrap();
    let public = public_file.lines().nth(1).unwrap().to_string();
    let key_id = public_file
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let secret = keys.path().join("sec.key").display().to_string();
    let setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[
            ("BACKUP_SIGNING_KEY_FILE", secret.as_str()),
            ("BACKUP_SIGNING_PUBLIC_KEYS", public.as_str()),
        ],
    );
    let manifest = backup(&setup);
    let id = backup_id(&manifest);
    let pristine = std::fs::read(&manifest).unwrap();
    assert_eq!(
        read_json(&manifest)["signing_key"],
        key_id.as_str(),
        "the manifest names its key"
    );
    assert!(
        stock_minisign_verifies(&manifest, &public),
        "the stock tool checks the signature"
    );
    let (ok, stdout, stderr) = run_cli(&setup.env, &["verify", "postgres", "--backup", &id]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("signature verified (key {key_id})")),
        "verify says how the manifest was checked: {stdout}"
    );

    // 1. The source facts changed: restore into the database the attacker names.
    let mut changed = read_json(&manifest);
    changed["source"]["database"] = other.name.clone().into();
    write_json(&manifest, &changed);
    assert!(!stock_minisign_verifies(&manifest, &public));
    assert_refused_everywhere(&setup, &id, "signature does not verify");

    // 2. The artifact swapped for the attacker's dump, sizes and both hashes recomputed.
    let mut swapped: serde_json::Value = serde_json::from_slice(&pristine).unwrap();
    let artifact = setup
        .storage_path()
        .join(swapped["artifacts"][0]["key"].as_str().unwrap());
    let pristine_artifact = std::fs::read(&artifact).unwrap();
    let dump = Command::new("pg_dump")
        .args(["-Fc", "-d", &common::pg_url(&other.name)])
        .output()
        .unwrap()
        .stdout;
    let stored = zstd::encode_all(dump.as_slice(), 3).unwrap();
    std::fs::write(&artifact, &stored).unwrap();
    let hex = |bytes: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    let record = &mut swapped["artifacts"][0];
    record["raw_size"] = dump.len().into();
    record["raw_sha256"] = hex(&dump).into();
    record["stored_size"] = stored.len().into();
    record["stored_sha256"] = hex(&stored).into();
    write_json(&manifest, &swapped);
    assert_refused_everywhere(&setup, &id, "signature does not verify");

    // 3. The signature removed: an unsigned manifest is refused...
    std::fs::remove_file(signature_of(&manifest)).unwrap();
    assert_refused_everywhere(&setup, &id, "is not signed");
    // ... unless unsigned manifests are explicitly allowed (then the output says so): what
    // a backup made before signing existed needs.
    std::fs::write(&manifest, &pristine).unwrap();
    std::fs::write(&artifact, &pristine_artifact).unwrap();
    let mut lenient = setup.env.clone();
    lenient.insert("BACKUP__SIGNING__ALLOW_UNSIGNED".into(), "true".into());
    let into = unique("sig_unsigned");
    let restored = TestDatabase::adopt(&into);
    let (ok, stdout, stderr) = run_cli(
        &lenient,
        &["restore", "postgres", "--backup", &id, "--into", &into],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("unsigned (accepted: signing.allow_unsigned)"),
        "{stdout}"
    );
    assert_eq!(psql(&restored.name, "SELECT count(*) FROM deals"), "500");
}

#[test]
fn keys_rotate_and_a_foreign_key_is_refused() {
    let source = fixture("sig_rotate");
    let keys = tempfile::tempdir().unwrap();
    let (old_secret, old_public) = minisign_key(keys.path(), "old");
    let (new_secret, new_public) = minisign_key(keys.path(), "new");
    let both = format!("{old_public},{new_public}");
    let signed_with = |secret: &Path, public: &str| {
        TestSetup::new(
            &source.name,
            Store::Local,
            &[
                ("BACKUP_SIGNING_KEY_FILE", secret.to_str().unwrap()),
                ("BACKUP_SIGNING_PUBLIC_KEYS", public),
            ],
        )
    };
    let mut setup = signed_with(&old_secret, &both);
    let old_backup = backup(&setup);
    // Rotation: the new key signs, both keys verify, in the same storage.
    setup.env.insert(
        "BACKUP_SIGNING_KEY_FILE".into(),
        new_secret.display().to_string(),
    );
    let new_backup = backup(&setup);
    assert_ne!(
        read_json(&old_backup)["signing_key"],
        read_json(&new_backup)["signing_key"]
    );
    for manifest in [&old_backup, &new_backup] {
        let (ok, stdout, stderr) = run_cli(
            &setup.env,
            &["verify", "postgres", "--backup", &backup_id(manifest)],
        );
        assert!(ok, "{stdout}{stderr}");
    }
    // The old key retired: its backups are refused, naming the key.
    setup
        .env
        .insert("BACKUP_SIGNING_PUBLIC_KEYS".into(), new_public.clone());
    let old_id = backup_id(&old_backup);
    assert_refused_everywhere(&setup, &old_id, "not in signing.public_keys");
    // `latest` is the newest backup that can be trusted.
    let (ok, stdout, stderr) = run_cli(&setup.env, &["verify", "postgres", "--backup", "latest"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&backup_id(&new_backup)), "{stdout}");

    // A key file others can read is refused before any work.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&new_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, stderr) = run_cli(&setup.env, &["run", "postgres"]);
    assert!(!ok);
    assert!(
        stderr.contains("readable by others") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    // Unsigned manifests refused and no key to check signed ones with: refused at start.
    setup.env.remove("BACKUP_SIGNING_KEY_FILE");
    setup.env.remove("BACKUP_SIGNING_PUBLIC_KEYS");
    let (ok, _, stderr) = run_cli(&setup.env, &["run", "postgres"]);
    assert!(!ok);
    assert!(stderr.contains("no signing key is configured"), "{stderr}");
}

#[test]
fn a_manifest_claiming_less_encryption_is_refused() {
    // An installation from before signing (unsigned manifests allowed) that encrypts.
    let source = fixture("sig_downgrade");
    let keys = tempfile::tempdir().unwrap();
    let (public, identity) = age_key(keys.path());
    let identity = identity.display().to_string();
    let mut setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[
            ("BACKUP_AGE_RECIPIENTS", public.as_str()),
            ("BACKUP_AGE_IDENTITY_FILE", identity.as_str()),
        ],
    );
    setup.env.remove("BACKUP_SIGNING_KEY_FILE");
    setup
        .env
        .insert("BACKUP__SIGNING__ALLOW_UNSIGNED".into(), "true".into());
    let manifest = backup(&setup);
    let id = backup_id(&manifest);
    let pristine = read_json(&manifest);
    assert!(!signature_of(&manifest).exists());

    // `encryption: null`: the worker would otherwise read the artifact as plaintext.
    let mut plain = pristine.clone();
    plain["artifacts"][0]["encryption"] = serde_json::Value::Null;
    write_json(&manifest, &plain);
    assert_refused_everywhere(&setup, &id, "is not encrypted");

    // Encrypted to a key this installation does not use.
    let mut foreign = pristine.clone();
    foreign["artifacts"][0]["encryption"]["recipients"] =
        serde_json::json!(["sha256:0123456789abcdef"]);
    write_json(&manifest, &foreign);
    assert_refused_everywhere(&setup, &id, "does not use (sha256:0123456789abcdef)");
    // ... unless it is a configured exception (a retired key, say).
    let mut excepted = setup.env.clone();
    excepted.insert(
        "BACKUP__PIPELINE__ACCEPTED_RECIPIENTS".into(),
        "sha256:0123456789abcdef".into(),
    );
    let (ok, stdout, stderr) = run_cli(&excepted, &["verify", "postgres", "--backup", &id]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("hashes match"), "{stdout}");

    write_json(&manifest, &pristine);
    let (ok, stdout, stderr) = run_cli(&setup.env, &["verify", "postgres", "--backup", &id]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("unsigned (accepted: signing.allow_unsigned)"),
        "{stdout}"
    );
}
