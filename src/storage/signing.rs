//! Signed manifests. The worker signs every manifest it commits with its minisign key
//! (Ed25519) and stores the signature beside it (`manifest.json.minisig`, what
//! `minisign -Vm manifest.json -P <public key>` checks). Restore, drill and verify check the
//! signature against the configured public keys before they use anything the manifest says:
//! bucket write access alone cannot make the worker restore data it did not write. Several
//! public keys may be configured at once (key rotation); the manifest names the key that
//! signed it (`signing_key`, minisign's key id).

use std::io::Read;
use std::path::Path;

/// The signature's key: `<manifest key>` + this.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("signing key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("public key `{key}`: {reason}")]
    PublicKey { key: String, reason: String },
    #[error("signing failed: {0}")]
    Sign(String),
    #[error(
        "manifest of {id} is not signed, and signing.allow_unsigned is off: refusing to use it"
    )]
    Unsigned { id: String },
    #[error("manifest of {id}: {reason}: refusing to use it")]
    BadSignature { id: String, reason: String },
}

/// minisign's key id: the key number as 16 upper-case hex digits, as `minisign` prints it.
fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    let n = keynum.len().min(8);
    bytes[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(bytes))
}

/// The worker's signing key.
pub struct Signer {
    key: minisign::SecretKey,
    key_id: String,
    public_key: String,
}

impl Signer {
    /// Loads an unencrypted minisign secret key file (`minisign -G -W -s <file>`), which
    /// must not be readable by group or others.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let fail = |reason: String| SigningError::Key {
            path: path.display().to_string(),
            reason,
        };
        let metadata = std::fs::metadata(path).map_err(|err| fail(err.to_string()))?;
        crate::private_file::check_owner_only(&metadata).map_err(fail)?;
        // A key file is two short lines; anything larger is not one.
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(4096).read_to_string(&mut text))
            .map_err(|err| fail(err.to_string()))?;
        let key = parse_secret_key(&text).map_err(fail)?;
        Ok(Signer::from_key(key))
    }

    fn from_key(key: minisign::SecretKey) -> Self {
        let public_key = minisign::PublicKey::from_secret_key(&key)
            .map(|public| public.to_base64())
            .unwrap_or_default();
        Signer {
            key_id: key_id(key.keynum()),
            key,
            public_key,
        }
    }

    /// The public half (base64), which verifies what this key signs.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The minisign signature file of `bytes`; its trusted comment names the backup.
    pub fn sign(&self, backup_id: &str, bytes: &[u8]) -> Result<String, SigningError> {
        let comment = format!("crm-backup manifest {backup_id}");
        minisign::sign(
            None,
            &self.key,
            std::io::Cursor::new(bytes),
            Some(&comment),
            Some("signature from crm-backup"),
        )
        .map(|signature| signature.into_string())
        .map_err(|err| SigningError::Sign(err.to_string()))
    }
}

/// An unencrypted minisign secret key (`untrusted comment` line, then base64 of: signature
/// and KDF algorithms, salt and limits, key number, Ed25519 key, checksum). The checksum is
/// not relied on (minisign 0.11 writes zeros for keys made with `-W`): the key proves itself
/// instead, by a signature that its own public half verifies.
fn parse_secret_key(text: &str) -> Result<minisign::SecretKey, String> {
    use base64::Engine;
    const LENGTH: usize = 158;
    let not_a_key = "not a minisign secret key (make one with `minisign -G -W`)";
    let encoded = text.lines().nth(1).ok_or(not_a_key)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| not_a_key)?;
    if bytes.len() != LENGTH || &bytes[0..2] != b"Ed" {
        return Err(not_a_key.into());
    }
    if bytes[2..4] != [0, 0] {
        return Err(
            "the key is encrypted with a password; the worker needs an unencrypted \
                    key (`minisign -G -W`), readable by its user only"
                .into(),
        );
    }
    let key = minisign::SecretKey::from_bytes(&bytes).map_err(|_| not_a_key)?;
    let public = minisign::PublicKey::from_secret_key(&key).map_err(|err| err.to_string())?;
    let probe = b"crm-backup signing key check";
    let signature = minisign::sign(None, &key, std::io::Cursor::new(probe), None, None)
        .map_err(|err| err.to_string())?;
    minisign::verify(
        &public,
        &signature,
        std::io::Cursor::new(probe),
        true,
        false,
        false,
    )
    .map_err(|_| "the key is corrupt: its signatures do not verify".to_string())?;
    Ok(key)
}

/// How a manifest passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Signed by the key with this id.
    Signed(String),
    /// Not signed, which `signing.allow_unsigned` accepts.
    UnsignedAllowed,
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Signed(key) => write!(f, "signature verified (key {key})"),
            Trust::UnsignedAllowed => write!(f, "unsigned (accepted: signing.allow_unsigned)"),
        }
    }
}

/// The public keys manifests are checked against.
pub struct Verifier {
    keys: Vec<(String, minisign::PublicKey)>,
    allow_unsigned: bool,
}

impl Verifier {
    /// `keys`: minisign public keys, each as its base64 text (`RW…`) or as the path of a
    /// public key file (`minisign.pub`; an absolute path).
    pub fn new(keys: &[String], allow_unsigned: bool) -> Result<Self, SigningError> {
        let keys = keys
            .iter()
            .map(|entry| {
                let fail = |reason: String| SigningError::PublicKey {
                    key: entry.clone(),
                    reason,
                };
                let text = if entry.starts_with('/') {
                    let mut text = String::new();
                    std::fs::File::open(entry)
                        .and_then(|file| file.take(4096).read_to_string(&mut text))
                        .map_err(|err| fail(err.to_string()))?;
                    // The key is the file's last line, after its comment.
                    text.lines()
                        .rfind(|line| !line.trim().is_empty())
                        .unwrap_or("")
                        .to_string()
                } else {
                    entry.clone()
                };
                let key = minisign::PublicKey::from_base64(text.trim())
                    .map_err(|err| fail(err.to_string()))?;
                Ok((key_id(key.keynum()), key))
            })
            .collect::<Result<_, SigningError>>()?;
        Ok(Verifier {
            keys,
            allow_unsigned,
        })
    }

    /// Checks the manifest `bytes` of backup `id` against their `signature` (None: there is
    /// none in storage).
    pub fn check(
        &self,
        id: &str,
        bytes: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<Trust, SigningError> {
        let bad = |reason: String| SigningError::BadSignature {
            id: id.to_string(),
            reason,
        };
        let Some(signature) = signature else {
            return if self.allow_unsigned {
                Ok(Trust::UnsignedAllowed)
            } else {
                Err(SigningError::Unsigned { id: id.to_string() })
            };
        };
        let text = std::str::from_utf8(signature)
            .map_err(|_| bad("the signature file is not text".into()))?;
        let signature = minisign::SignatureBox::from_string(text)
            .map_err(|err| bad(format!("the signature file cannot be read: {err}")))?;
        let signed_by = key_id(signature.keynum());
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == signed_by) else {
            return Err(bad(format!(
                "it is signed by key {signed_by}, which is not in signing.public_keys"
            )));
        };
        minisign::verify(
            key,
            &signature,
            std::io::Cursor::new(bytes),
            true,
            false,
            false,
        )
        .map_err(|err| bad(format!("the signature does not verify: {err}")))?;
        Ok(Trust::Signed(signed_by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (Signer, String) {
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let public = pair.pk.to_base64();
        let signer = Signer::from_key(pair.sk);
        assert_eq!(signer.public_key(), public);
        (signer, public)
    }

    #[test]
    fn a_signed_manifest_verifies_and_any_change_does_not() {
        let (signer, public) = keypair();
        let (other, other_public) = keypair();
        let manifest = br#"{"id":"20261126T023000Z-postgres-k3f9m2","artifacts":[]}"#;
        let signature = signer
            .sign("20261126T023000Z-postgres-k3f9m2", manifest)
            .unwrap();
        let verifier = Verifier::new(&[other_public.clone(), public], false).unwrap();
        assert_eq!(
            verifier
                .check("x", manifest, Some(signature.as_bytes()))
                .unwrap(),
            Trust::Signed(signer.key_id().to_string())
        );
        let mut tampered = manifest.to_vec();
        tampered[10] ^= 1;
        let err = verifier
            .check("x", &tampered, Some(signature.as_bytes()))
            .unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        // Signed by a key nobody configured.
        let foreign = keypair().0.sign("x", manifest).unwrap();
        let err = verifier
            .check("x", manifest, Some(foreign.as_bytes()))
            .unwrap_err();
        assert!(
            err.to_string().contains("not in signing.public_keys"),
            "{err}"
        );
        // Unsigned: refused unless allowed.
        assert!(matches!(
            verifier.check("x", manifest, None),
            Err(SigningError::Unsigned { .. })
        ));
        let lenient = Verifier::new(&[other_public], true).unwrap();
        assert_eq!(
            lenient.check("x", manifest, None).unwrap(),
            Trust::UnsignedAllowed
        );
        assert!(lenient.check("x", b"{}", Some(b"garbage")).is_err());
        // A public key given as the path of a minisign public key file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.pub");
        let key_file = format!(
            "untrusted comment: minisign public key {}\n{}\n",
            signer.key_id(),
            signer.public_key()
        );
        std::fs::write(&file, key_file).unwrap();
        let from_file = Verifier::new(&[file.display().to_string()], false).unwrap();
        assert!(
            from_file
                .check("x", manifest, Some(signature.as_bytes()))
                .is_ok()
        );
        assert!(Verifier::new(&["/nonexistent/worker.pub".into()], false).is_err());
        drop(other);
    }

    #[test]
    fn secret_key_files_are_checked() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let text = pair.sk.to_box(None).unwrap().to_string();
        assert!(parse_secret_key(&text).is_ok());
        let lines: Vec<&str> = text.lines().collect();
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = engine.decode(lines[1]).unwrap();
            edit(&mut bytes);
            format!("{}\n{}\n", lines[0], engine.encode(&bytes))
        };
        // minisign 0.11's `-W` keys carry a zero checksum: accepted, the key proves itself.
        assert!(parse_secret_key(&with(&|b| b[126..].fill(0))).is_ok());
        // A damaged key does not.
        let err = parse_secret_key(&with(&|b| b[70] ^= 1)).unwrap_err();
        assert!(err.contains("corrupt"), "{err}");
        let err = parse_secret_key(&with(&|b| b[2..4].copy_from_slice(b"Sc"))).unwrap_err();
        assert!(err.contains("encrypted"), "{err}");
        assert!(parse_secret_key("untrusted comment: x\nbm90IGEga2V5\n").is_err());
        assert!(parse_secret_key("").is_err());
    }
}
