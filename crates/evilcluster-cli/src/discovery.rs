//! Finding a running cluster's master from its discovery files.

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use evilcluster_wire::control;
use evilcluster_wire::Cookie;

use crate::error::{CliError, NotRunning};

/// The discovery directory of the current user: `<temp dir>/evilcluster-<uid>`.
pub fn user_discovery_dir() -> PathBuf {
    control::discovery_dir(rustix::process::getuid().as_raw())
}

/// A master as advertised by its discovery files.
#[derive(Debug, Clone)]
pub struct Master {
    /// The cluster's name.
    pub cluster: String,
    /// The endpoint file it was read from.
    pub endpoint_file: PathBuf,
    /// The master's socket.
    pub socket: PathBuf,
    /// The master's pid.
    pub pid: u32,
    /// The cluster cookie.
    pub cookie: Cookie,
}

/// Checks that `cluster` can be a cluster's name (the runtime's rule).
pub fn validate_name(cluster: &str) -> Result<(), CliError> {
    if cluster.is_empty() || cluster.contains('/') || cluster.contains('\0') {
        return Err(CliError::InvalidName {
            cluster: cluster.to_owned(),
        });
    }
    Ok(())
}

/// Reads the discovery files of `cluster` in `dir` and checks that the
/// master they name is alive. Does not connect.
///
/// Nothing is trusted unless it is private to this user: `dir` must be a
/// real directory (not a symbolic link) owned by this user with no group or
/// other permissions, and so must each file read from it (regular, not a
/// link). Anything else is [`CliError::Untrusted`]: another user could have
/// planted a fake endpoint, or read the cookie.
pub fn locate(dir: &Path, cluster: &str) -> Result<Master, CliError> {
    validate_name(cluster)?;
    let uid = rustix::process::getuid().as_raw();
    let endpoint_file = control::endpoint_file(dir, cluster);
    let no_endpoint = || CliError::NotRunning {
        cluster: cluster.to_owned(),
        reason: NotRunning::NoEndpointFile {
            file: endpoint_file.clone(),
        },
    };
    let dir_fd = match control::open_private_dir(dir, uid, false) {
        Ok(fd) => fd,
        Err(untrusted) if untrusted.is_not_found() => return Err(no_endpoint()),
        Err(untrusted) => return Err(untrusted.into()),
    };
    let read = |name: String| -> Result<Option<String>, CliError> {
        let file = dir.join(&name);
        let mut opened = match control::open_private_file(&dir_fd, dir, &name, uid) {
            Ok(opened) => opened,
            Err(untrusted) if untrusted.is_not_found() => return Ok(None),
            Err(untrusted) => return Err(untrusted.into()),
        };
        let mut text = String::new();
        opened
            .read_to_string(&mut text)
            .map_err(|source| CliError::ReadFile { file, source })?;
        Ok(Some(text))
    };
    let text = read(format!("{cluster}.endpoint"))?.ok_or_else(no_endpoint)?;
    let (socket, pid) = control::parse_endpoint(&text).map_err(|detail| CliError::MalformedFile {
        file: endpoint_file.clone(),
        detail,
    })?;
    if !control::pid_alive(pid) {
        return Err(CliError::NotRunning {
            cluster: cluster.to_owned(),
            reason: NotRunning::MasterGone {
                file: endpoint_file,
                pid,
            },
        });
    }
    let cookie_file = control::cookie_file(dir, cluster);
    let cookie_text = read(format!("{cluster}.cookie"))?.ok_or_else(|| CliError::ReadFile {
        file: cookie_file.clone(),
        source: ErrorKind::NotFound.into(),
    })?;
    let cookie = parse_cookie(&cookie_text).map_err(|detail| CliError::MalformedFile {
        file: cookie_file,
        detail,
    })?;
    Ok(Master {
        cluster: cluster.to_owned(),
        endpoint_file,
        socket,
        pid,
        cookie,
    })
}

/// Parses a cookie file: the cookie, hex-encoded.
pub fn parse_cookie(text: &str) -> Result<Cookie, String> {
    let hex_text = text.trim();
    if hex_text.is_empty() {
        return Err("the cookie is empty".into());
    }
    hex::decode(hex_text)
        .map(Cookie::new)
        .map_err(|error| format!("the cookie is not hex: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_hex() {
        assert_eq!(parse_cookie("00ff10\n").unwrap(), Cookie::new(vec![0, 255, 16]));
        assert!(parse_cookie("xyz").is_err());
        assert!(parse_cookie("\n").is_err());
    }

    #[test]
    fn names_with_slashes_are_refused() {
        assert!(validate_name("myapp").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
    }

    #[test]
    fn missing_and_stale_endpoints_are_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("discovery");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let write = |path: std::path::PathBuf, text: &str| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        };
        let error = locate(&dir, "nothing").unwrap_err();
        assert!(
            matches!(
                &error,
                CliError::NotRunning {
                    reason: NotRunning::NoEndpointFile { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(error.exit_code(), 1);

        // A pid that cannot exist.
        write(control::endpoint_file(&dir, "stale"), "/nowhere.sock\n4294967295\n");
        let error = locate(&dir, "stale").unwrap_err();
        assert!(
            matches!(
                &error,
                CliError::NotRunning {
                    reason: NotRunning::MasterGone { pid: 4294967295, .. },
                    ..
                }
            ),
            "{error:?}"
        );

        write(control::endpoint_file(&dir, "garbled"), "/x.sock\nnot a pid\n");
        let error = locate(&dir, "garbled").unwrap_err();
        assert!(matches!(&error, CliError::MalformedFile { .. }), "{error:?}");
        assert_eq!(error.exit_code(), 2);

        let alive = format!("/x.sock\n{}\n", std::process::id());
        write(control::endpoint_file(&dir, "live"), &alive);
        write(control::cookie_file(&dir, "live"), "0a0b\n");
        let master = locate(&dir, "live").unwrap();
        assert_eq!(master.pid, std::process::id());
        assert_eq!(master.cookie, Cookie::new(vec![10, 11]));

        // The same files, readable by others: not trusted.
        std::fs::set_permissions(
            control::cookie_file(&dir, "live"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        let error = locate(&dir, "live").unwrap_err();
        assert!(matches!(&error, CliError::Untrusted(_)), "{error:?}");
        assert_eq!(error.exit_code(), 2);
    }
}
