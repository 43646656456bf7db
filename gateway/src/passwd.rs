//! `waystation passwd`: add, change or remove a user in a password file, so that the daemon
//! can still read the file afterwards.
//!
//! The broker's writer replaces the file atomically with a new one of mode 0600 owned by
//! whoever ran the command, usually root. The packaged unit runs the daemon as the
//! `waystation` user, which reads `/etc/waystation` through its group (the package makes the
//! directory root:waystation 0750). So after the write:
//! - a file that existed gets back its owner, group and mode;
//! - a new file in a directory owned by another group than the file's (or a set-group-id
//!   directory) gets the directory's group and mode 0640: group-readable, never world-readable.
//!
//! Anywhere else (a user's own file, `cargo install` style) a new file stays 0600, as before.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

/// `waystation passwd`: exit 0 when done, 1 when it could not be (the reason on stderr).
pub fn main(file: &Path, user: &str, delete: bool, iterations: u32) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        if iterations == 0 {
            anyhow::bail!("--iterations must be at least 1");
        }
        let before = Access::of_existing(file)?;
        if delete {
            if !waystation_broker::auth::update_password_file(file, user, None, iterations)? {
                anyhow::bail!("user {user:?} is not in {}", file.display());
            }
        } else {
            let password = read_new_password()?;
            waystation_broker::auth::update_password_file(
                file,
                user,
                Some(password.as_bytes()),
                iterations,
            )?;
        }
        restore_access(file, before)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Owner, group and permission bits of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Access {
    uid: u32,
    gid: u32,
    mode: u32,
}

impl Access {
    fn of(meta: &std::fs::Metadata) -> Access {
        Access {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        }
    }

    /// None when the file does not exist yet.
    fn of_existing(file: &Path) -> anyhow::Result<Option<Access>> {
        match std::fs::metadata(file) {
            Ok(m) => Ok(Some(Access::of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", file.display())),
        }
    }
}

/// What the rewritten `file` (now `now`) should look like: `before` if it existed, else the
/// group rule of the module's comment (`dir`: its directory). None: leave it as it is.
fn wanted(before: Option<Access>, now: Access, dir: Access) -> Option<Access> {
    let want = match before {
        Some(old) => old,
        None if dir.gid != now.gid || dir.mode & 0o2000 != 0 => Access {
            gid: dir.gid,
            mode: 0o640,
            ..now
        },
        None => return None,
    };
    (want != now).then_some(want)
}

fn restore_access(file: &Path, before: Option<Access>) -> anyhow::Result<()> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let now = Access::of(&std::fs::metadata(file)?);
    let dir_access = Access::of(&std::fs::metadata(dir)?);
    let Some(want) = wanted(before, now, dir_access) else {
        return Ok(());
    };
    let owner = (want.uid != now.uid).then_some(want.uid);
    let group = (want.gid != now.gid).then_some(want.gid);
    // Group first, then the mode: the file is never readable by a group it should not be.
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(file, owner, group).map_err(|e| {
            anyhow::anyhow!(
                "{} was written, but giving it owner {} and group {} failed ({e}): the daemon may not be able to read it; fix with: chown {}:{} {0} && chmod {:o} {0}",
                file.display(), want.uid, want.gid, want.uid, want.gid, want.mode
            )
        })?;
    }
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(want.mode))?;
    Ok(())
}

/// From the terminal (no echo, asked twice) or the first line of a non-terminal stdin.
fn read_new_password() -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Reenter password: ")?;
        if first != again {
            anyhow::bail!("the passwords do not match");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_GROUP: Access = Access {
        uid: 0,
        gid: 0,
        mode: 0o600,
    };

    #[test]
    fn a_new_file_takes_the_group_of_a_directory_owned_by_another_group() {
        let etc_waystation = Access {
            uid: 0,
            gid: 998,
            mode: 0o750,
        };
        let want = wanted(None, ROOT_GROUP, etc_waystation).expect("changed");
        assert_eq!(
            want,
            Access {
                uid: 0,
                gid: 998,
                mode: 0o640
            }
        );
    }

    #[test]
    fn a_new_file_in_a_directory_of_its_own_group_stays_private() {
        let home = Access {
            uid: 1000,
            gid: 1000,
            mode: 0o755,
        };
        let new = Access {
            uid: 1000,
            gid: 1000,
            mode: 0o600,
        };
        assert_eq!(wanted(None, new, home), None);
        // A set-group-id directory shares its files with its group on purpose.
        let shared = Access {
            mode: 0o2770,
            ..home
        };
        assert_eq!(wanted(None, new, shared).map(|a| a.mode), Some(0o640));
    }

    #[test]
    fn an_existing_file_keeps_its_owner_group_and_mode() {
        let old = Access {
            uid: 0,
            gid: 998,
            mode: 0o640,
        };
        let dir = Access {
            uid: 0,
            gid: 0,
            mode: 0o755,
        };
        assert_eq!(wanted(Some(old), ROOT_GROUP, dir), Some(old));
        assert_eq!(wanted(Some(ROOT_GROUP), ROOT_GROUP, dir), None);
    }

    /// The whole command on real files. The group part needs root (CI runs as root).
    #[test]
    fn passwd_leaves_a_file_the_service_group_can_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("passwd");
        let mine = Access::of(&std::fs::metadata(dir.path()).expect("meta"));
        // Without another group: the file stays private to its owner.
        let before = Access::of_existing(&file).expect("stat");
        std::fs::write(&file, "u:x\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        restore_access(&file, before).expect("restore");
        let meta = std::fs::metadata(&file).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        if mine.uid != 0 {
            eprintln!("not root: the chgrp half of this test is skipped");
            return;
        }
        // As the package sets it up: a directory of another group.
        let other_gid = 64_123;
        std::os::unix::fs::chown(dir.path(), None, Some(other_gid)).expect("chgrp dir");
        std::fs::remove_file(&file).expect("rm");
        std::fs::write(&file, "u:x\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        restore_access(&file, None).expect("restore");
        let meta = std::fs::metadata(&file).expect("meta");
        assert_eq!((meta.gid(), meta.mode() & 0o777), (other_gid, 0o640));
        // A rewrite (the broker's writer makes a fresh 0600 root:root file) keeps that.
        let before = Access::of_existing(&file).expect("stat");
        std::fs::remove_file(&file).expect("rm");
        std::fs::write(&file, "u:y\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::chown(&file, None, Some(0)).expect("chgrp file");
        restore_access(&file, before).expect("restore");
        let meta = std::fs::metadata(&file).expect("meta");
        assert_eq!((meta.gid(), meta.mode() & 0o777), (other_gid, 0o640));
    }
}
