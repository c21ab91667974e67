//! [`ImageMetadata`]: how to run the image, resolved at import.

use std::io::Read;

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::error::OciError;
use super::manifest::Plan;
use super::tree::Tree;

/// Largest `/etc/passwd` or `/etc/group` read.
const MAX_DB_BYTES: u64 = 4 << 20;

/// The user the image runs as, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
}

/// What the import keeps of the image config, written as JSON to
/// `<store>/<name>/image.json` and `/etc/warren/image.json` in the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMetadata {
    /// The image's name in the store.
    pub name: String,
    /// `Entrypoint` followed by `Cmd` (OCI semantics); may be empty.
    pub argv: Vec<String>,
    /// `"K=V"` as in the config.
    pub env: Vec<String>,
    /// `WorkingDir`, `"/"` when unset.
    pub working_dir: String,
    /// `User` resolved against the image's `/etc/passwd` and `/etc/group`;
    /// `None` when unset (root).
    pub user: Option<UserSpec>,
    /// `ExposedPorts` keys, sorted (`"8080/tcp"`, …).
    pub exposed_ports: Vec<String>,
    /// `"oci-layout <manifest digest>"` or `"docker-archive <image ID>"`
    /// (the image ID is the config's digest).
    pub source: String,
    /// The layers' digests in order (as the manifest lists them; for a
    /// docker archive without blob digests, the uncompressed `diff_ids`).
    pub layers: Vec<String>,
    /// The config's digest.
    pub config_digest: String,
    /// The config's `architecture` (`"amd64"`, …; empty when unset).
    pub architecture: String,
}

/// The metadata of `plan`, with `user` already resolved.
pub(crate) fn build(name: &str, plan: &Plan, user: Option<UserSpec>) -> ImageMetadata {
    let run = plan.config.config.as_ref();
    let mut argv = run.and_then(|c| c.entrypoint.clone()).unwrap_or_default();
    argv.extend(run.and_then(|c| c.cmd.clone()).unwrap_or_default());
    let working_dir = run
        .and_then(|c| c.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    ImageMetadata {
        name: name.to_string(),
        argv,
        env: run.and_then(|c| c.env.clone()).unwrap_or_default(),
        working_dir,
        user,
        exposed_ports: run
            .and_then(|c| c.exposed_ports.as_ref())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default(),
        source: format!("{} {}", plan.kind, plan.manifest_digest),
        layers: plan
            .layers
            .iter()
            .map(|l| l.digest.as_ref().unwrap_or(&l.diff_id).0.clone())
            .collect(),
        config_digest: plan.config_digest.clone(),
        architecture: plan.config.architecture.clone(),
    }
}

/// Reads `etc/<file>` of the tree, resolving symlinks as if the tree were
/// `/` (`RESOLVE_IN_ROOT`); `None` when it does not exist.
fn read_db(tree: &Tree, file: &str) -> Result<Option<String>, String> {
    let path = format!("etc/{file}");
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    let fd = match rfs::openat2(tree.root(), &path, flags, Mode::empty(), resolve) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        // Kernels before 5.6: no symlinks at all on the way.
        Err(Errno::NOSYS) => match rfs::openat(
            tree.root(),
            "etc",
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(|etc| rfs::openat(&etc, file, flags | OFlags::NOFOLLOW, Mode::empty()))
        {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(format!("cannot open /{path}: {e}")),
        },
        Err(e) => return Err(format!("cannot open /{path}: {e}")),
    };
    let st = rfs::fstat(&fd).map_err(|e| format!("/{path}: {e}"))?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Err(format!("/{path} is not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_DB_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("/{path}: {e}"))?;
    Ok(Some(text))
}

/// Resolves `Config.User` against the tree's `/etc/passwd` and `/etc/group`.
pub(crate) fn resolve_user_in(tree: &Tree, user: &str) -> Result<Option<UserSpec>, OciError> {
    let err = |reason: String| OciError::User {
        user: user.to_string(),
        reason,
    };
    if user.is_empty() {
        return Ok(None);
    }
    // Read even for a numeric uid: it takes its primary group from there.
    let passwd = read_db(tree, "passwd").map_err(err)?;
    let group = if user.contains(':') {
        read_db(tree, "group").map_err(err)?
    } else {
        None
    };
    resolve_user(user, passwd.as_deref(), group.as_deref())
        .map(Some)
        .map_err(err)
}

fn number(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// `uid`, `uid:gid`, `name`, `name:group` (and mixes) → numbers. A bare
/// user takes its primary group from passwd (0 for a numeric uid passwd
/// does not list).
pub(crate) fn resolve_user(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<UserSpec, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // name:x:uid:gid:...
    let users = || {
        passwd.into_iter().flat_map(str::lines).filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4)
                .then(|| Some((f[0], number(f[2])?, number(f[3])?)))
                .flatten()
        })
    };
    let (uid, primary) = if let Some(uid) = number(user) {
        (uid, users().find(|(_, u, _)| *u == uid).map(|(_, _, g)| g).unwrap_or(0))
    } else {
        if user.is_empty() {
            return Err("empty user name".into());
        }
        if passwd.is_none() {
            return Err(format!("the image has no /etc/passwd to look up user {user:?} in"));
        }
        let (_, uid, gid) = users()
            .find(|(n, _, _)| *n == user)
            .ok_or_else(|| format!("no user {user:?} in the image's /etc/passwd"))?;
        (uid, gid)
    };
    let gid = match grp {
        None => primary,
        Some(g) => match number(g) {
            Some(gid) => gid,
            None if g.is_empty() => return Err("empty group name".into()),
            None => {
                let Some(group) = group else {
                    return Err(format!("the image has no /etc/group to look up group {g:?} in"));
                };
                group
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 3 && f[0] == g).then(|| number(f[2])).flatten()
                    })
                    .ok_or_else(|| format!("no group {g:?} in the image's /etc/group"))?
            }
        },
    };
    Ok(UserSpec { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:33::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:\n";

    fn r(spec: &str) -> Result<UserSpec, String> {
        resolve_user(spec, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn users_resolve_to_numbers() {
        assert_eq!(r("app"), Ok(UserSpec { uid: 1000, gid: 1000 }));
        assert_eq!(r("app:staff"), Ok(UserSpec { uid: 1000, gid: 50 }));
        assert_eq!(r("1000"), Ok(UserSpec { uid: 1000, gid: 1000 }));
        assert_eq!(r("4242"), Ok(UserSpec { uid: 4242, gid: 0 }));
        assert_eq!(r("33:7"), Ok(UserSpec { uid: 33, gid: 7 }));
        assert_eq!(r("web:0"), Ok(UserSpec { uid: 33, gid: 0 }));
        assert_eq!(r("4242:staff"), Ok(UserSpec { uid: 4242, gid: 50 }));
        assert_eq!(resolve_user("7:8", None, None), Ok(UserSpec { uid: 7, gid: 8 }));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(r("nobody").unwrap_err().contains("no user \"nobody\""));
        assert!(r("app:wheel").unwrap_err().contains("no group \"wheel\""));
        assert!(resolve_user("app", None, None).unwrap_err().contains("no /etc/passwd"));
        assert!(r(":50").is_err());
        assert!(r("app:").is_err());
    }
}
