//! Authentication: who may connect.
//!
//! Users live in a Mosquitto 2 password file, so a site can bring the file it already has:
//! one `user:hash` per line, where the hash is
//! - `$7$<iterations>$<salt, base64>$<hash, base64>`: PBKDF2-HMAC-SHA512 over the password
//!   with the decoded salt, 64-byte output (what `mosquitto_passwd` 2.x writes), or
//! - `$6$<salt, base64>$<hash, base64>`: SHA-512 of the password followed by the salt
//!   (Mosquitto 1.x files).
//!
//! Blank lines and lines starting with `#` are skipped. Comparisons are constant time,
//! and an unknown user costs the same hashing work as a known one, so timing does not tell
//! which user names exist. Hashing is slow on purpose: callers run [`PasswordFile::verify`]
//! off the async runtime (`spawn_blocking`), a few at a time (see `Authenticator`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::policy::acl::{Acl, ClientAcl};

/// Iterations `waystation passwd` uses for new `$7$` entries. Mosquitto 2.0 writes 101,
/// far below current advice; 20,000 keeps a CONNECT check near 10 ms on a Raspberry Pi 4
/// class CPU (checks are limited to `VERIFY_SLOTS` at a time, off the async runtime).
pub const DEFAULT_ITERATIONS: u32 = 20_000;

/// Password checks running at once; more wait their turn, so a flood of CONNECTs with
/// passwords cannot take every CPU.
pub const VERIFY_SLOTS: usize = 2;

/// Iterations above this are refused when reading a file (a typo could make every
/// CONNECT take minutes).
const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Clone)]
enum Hash {
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = text.split('$').collect();
        let b64 = |s: &str, what: &str| {
            B64.decode(s)
                .map_err(|e| format!("{what} is not valid base64: {e}"))
        };
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations.parse().map_err(|_| format!("iteration count {iterations:?} is not a number"))?;
                if iterations == 0 || iterations > MAX_ITERATIONS {
                    return Err(format!("iteration count {iterations} is out of range 1..={MAX_ITERATIONS}"));
                }
                let hash = b64(hash, "hash")?;
                if hash.len() != 64 {
                    return Err(format!("a $7$ hash is 64 bytes, this one is {}", hash.len()));
                }
                Ok(Hash::Pbkdf2Sha512 { iterations, salt: b64(salt, "salt")?, hash })
            }
            ["", "6", salt, hash] => {
                let hash = b64(hash, "hash")?;
                if hash.len() != 64 {
                    return Err(format!("a $6$ hash is 64 bytes, this one is {}", hash.len()));
                }
                Ok(Hash::Sha512 { salt: b64(salt, "salt")?, hash })
            }
            ["", "8", ..] => Err("argon2id ($8$) hashes are not supported: re-create the user with `waystation passwd`".into()),
            _ => Err("not a Mosquitto password hash ($7$<iterations>$<salt>$<hash> or $6$<salt>$<hash>); plain-text passwords are not accepted".into()),
        }
    }

    fn compute(&self, password: &[u8]) -> Vec<u8> {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations, salt, ..
            } => {
                let mut out = vec![0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out
            }
            Hash::Sha512 { salt, .. } => {
                let mut h = Sha512::new();
                h.update(password);
                h.update(salt);
                h.finalize().to_vec()
            }
        }
    }

    fn expected(&self) -> &[u8] {
        match self {
            Hash::Pbkdf2Sha512 { hash, .. } | Hash::Sha512 { hash, .. } => hash,
        }
    }

    fn matches(&self, password: &[u8]) -> bool {
        bool::from(self.compute(password).ct_eq(self.expected()))
    }
}

/// A password file that could not be used: names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The users of a password file. Cheap to share (`Arc`); never holds a password.
#[derive(Clone)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
    /// Verified instead of a missing user's hash, so both cost the same.
    dummy: Hash,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        PasswordFile::parse(&text).map_err(|(line, message)| AuthFileError::Line {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses file text; the error is (line number, reason).
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = BTreeMap::new();
        let mut iterations = DEFAULT_ITERATIONS;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i + 1, "expected user:hash".into()));
            };
            if user.is_empty() {
                return Err((i + 1, "empty user name".into()));
            }
            let hash =
                Hash::parse(hash.trim()).map_err(|m| (i + 1, format!("user {user:?}: {m}")))?;
            if let Hash::Pbkdf2Sha512 { iterations: n, .. } = &hash {
                iterations = *n;
            }
            if users.insert(user.to_string(), hash).is_some() {
                return Err((i + 1, format!("user {user:?} appears twice")));
            }
        }
        let dummy = Hash::Pbkdf2Sha512 {
            iterations,
            salt: vec![0; 12],
            hash: vec![0; 64],
        };
        Ok(PasswordFile { users, dummy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Slow (the hash's work factor): call it off the runtime.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.matches(password),
            None => {
                let _ = self.dummy.matches(password);
                false
            }
        }
    }
}

/// A new `$7$` hash (PBKDF2-HMAC-SHA512, 12 random salt bytes) in Mosquitto's format.
pub fn hash_password(password: &[u8], iterations: u32) -> std::io::Result<String> {
    let mut salt = [0u8; 12];
    getrandom::getrandom(&mut salt)
        .map_err(|e| std::io::Error::other(format!("no random numbers: {e}")))?;
    let hash = Hash::Pbkdf2Sha512 {
        iterations,
        salt: salt.to_vec(),
        hash: Vec::new(),
    };
    let digest = hash.compute(password);
    Ok(format!(
        "$7${iterations}${}${}",
        B64.encode(salt),
        B64.encode(digest)
    ))
}

/// Adds or replaces `user` (`Some(password)`) or removes it (`None`) in the password file
/// at `path`, keeping every other line as it was. Written to a temporary file in the same
/// directory (mode 0600) and renamed over the old one, so a crash leaves either file whole.
/// Returns false when removing a user that is not there.
pub fn update_password_file(
    path: &Path,
    user: &str,
    password: Option<&[u8]>,
    iterations: u32,
) -> std::io::Result<bool> {
    if user.is_empty() || user.contains(':') || user.contains('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a user name must be non-empty and contain no ':' or newline",
        ));
    }
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let new_entry = password.map(|p| hash_password(p, iterations)).transpose()?;
    let mut out = String::new();
    let mut found = false;
    for line in old.lines() {
        let is_user =
            !line.starts_with('#') && line.split_once(':').is_some_and(|(u, _)| u == user);
        if is_user {
            found = true;
            if let Some(entry) = &new_entry {
                out.push_str(&format!("{user}:{entry}\n"));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        match &new_entry {
            Some(entry) => out.push_str(&format!("{user}:{entry}\n")),
            None => return Ok(false),
        }
    }
    write_atomically(path, out.as_bytes())?;
    Ok(true)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What a listener needs to decide who may connect and what they may do. The default
/// lets everyone in and everywhere (no password file, no ACL, anonymous allowed): the
/// daemon decides the real policy from its config (see `docs/security.md`).
#[derive(Clone)]
pub struct Security {
    pub passwords: Option<Arc<PasswordFile>>,
    /// Clients that send no user name are let in. With no `passwords`, a user name a
    /// client sends is taken at its word (used only for ACL `user` blocks).
    pub allow_anonymous: bool,
    pub acl: Option<Arc<Acl>>,
    // Hook for TLS (issue 7 part B): a listener requiring client certificates would pass
    // the certificate's identity here as the user name, bypassing the password check.
}

impl Default for Security {
    fn default() -> Self {
        Security {
            passwords: None,
            allow_anonymous: true,
            acl: None,
        }
    }
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("passwords", &self.passwords)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("acl", &self.acl.is_some())
            .finish()
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No user name and anonymous access is off: CONNACK 5.
    AnonymousNotAllowed,
    /// Unknown user or wrong password (or none): CONNACK 4.
    BadCredentials,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::AnonymousNotAllowed => "anonymous clients are not allowed",
            Refusal::BadCredentials => "unknown user or wrong password",
        }
    }
}

/// The per-broker authenticator shared by every connection.
pub struct Authenticator {
    pub security: Security,
    slots: Semaphore,
}

impl Authenticator {
    pub fn new(security: Security) -> Authenticator {
        Authenticator {
            security,
            slots: Semaphore::new(VERIFY_SLOTS),
        }
    }

    /// Checks a CONNECT's credentials. The password check runs on the blocking pool, at
    /// most `VERIFY_SLOTS` at a time.
    /// A missing password is checked as an empty one (MQTT 3.1.1 allows a user name alone).
    pub async fn check(&self, username: Option<&str>, password: &[u8]) -> Result<(), Refusal> {
        let Some(user) = username else {
            return if self.security.allow_anonymous {
                Ok(())
            } else {
                Err(Refusal::AnonymousNotAllowed)
            };
        };
        let Some(passwords) = &self.security.passwords else {
            // No password file: user names are not verified (Mosquitto does the same).
            return if self.security.allow_anonymous {
                Ok(())
            } else {
                Err(Refusal::BadCredentials)
            };
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return Err(Refusal::BadCredentials);
        };
        let (passwords, user, password) = (passwords.clone(), user.to_string(), password.to_vec());
        match tokio::task::spawn_blocking(move || passwords.verify(&user, &password)).await {
            Ok(true) => Ok(()),
            _ => Err(Refusal::BadCredentials),
        }
    }

    /// The ACL rules that apply to this client; `None` when no ACL is configured.
    pub fn client_acl(&self, client_id: &str, username: Option<&str>) -> Option<Arc<ClientAcl>> {
        self.security
            .acl
            .as_ref()
            .map(|acl| Arc::new(acl.for_client(client_id, username)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by Debian's `mosquitto_passwd -c -b file alice secret` (mosquitto 2.0.11).
    const MOSQUITTO_LINE: &str =
        "alice:$7$101$1ELVgIu9bPHGbNxD$oZR9rrrD2ihIRGcit8x4tI7kNgE9OFH3b0g6SGfg7v5Tgj3PnvuISiHEs5idAJ0PpvmO1oDo0RaCEOew+OGoQA==";

    #[test]
    fn mosquitto_2_file_verifies() {
        let file = PasswordFile::parse(&format!("# comment\n\n{MOSQUITTO_LINE}\n")).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"Secret"));
        assert!(!file.verify("bob", b"secret"));
    }

    #[test]
    fn sha512_entries_verify() {
        let salt = b"0123456789ab";
        let mut h = Sha512::new();
        h.update(b"pw");
        h.update(salt);
        let line = format!("old:$6${}${}\n", B64.encode(salt), B64.encode(h.finalize()));
        let file = PasswordFile::parse(&line).unwrap();
        assert!(file.verify("old", b"pw"));
        assert!(!file.verify("old", b"pw2"));
    }

    #[test]
    fn generated_hash_round_trips() {
        let entry = hash_password(b"hunter2", 1000).unwrap();
        assert!(entry.starts_with("$7$1000$"));
        let file = PasswordFile::parse(&format!("u:{entry}")).unwrap();
        assert!(file.verify("u", b"hunter2"));
        assert!(!file.verify("u", b"hunter3"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            PasswordFile::parse("a:$7$101$AAAA$AAAA\n").unwrap_err().0,
            1
        );
        let (line, msg) = PasswordFile::parse("# x\nbob:plain\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("plain-text"), "{msg}");
        assert_eq!(PasswordFile::parse("nocolon\n").unwrap_err().0, 1);
        let twice = format!("{MOSQUITTO_LINE}\n{MOSQUITTO_LINE}\n");
        assert_eq!(PasswordFile::parse(&twice).unwrap_err().0, 2);
    }

    #[test]
    fn update_adds_changes_and_deletes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, format!("# site users\n{MOSQUITTO_LINE}\n")).unwrap();
        assert!(update_password_file(&path, "bob", Some(b"b1"), 100).unwrap());
        assert!(update_password_file(&path, "bob", Some(b"b2"), 100).unwrap());
        let file = PasswordFile::load(&path).unwrap();
        assert!(
            file.verify("bob", b"b2")
                && !file.verify("bob", b"b1")
                && file.verify("alice", b"secret")
        );
        assert!(update_password_file(&path, "alice", None, 100).unwrap());
        assert!(!update_password_file(&path, "alice", None, 100).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# site users\nbob:$7$100$"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(update_password_file(&path, "a:b", Some(b"x"), 100).is_err());
    }
}
