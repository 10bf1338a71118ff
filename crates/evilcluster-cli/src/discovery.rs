//! Finding a running cluster's master from its discovery files.

use std::io::ErrorKind;
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
pub fn locate(dir: &Path, cluster: &str) -> Result<Master, CliError> {
    validate_name(cluster)?;
    let endpoint_file = control::endpoint_file(dir, cluster);
    let text = match std::fs::read_to_string(&endpoint_file) {
        Ok(text) => text,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return Err(CliError::NotRunning {
                cluster: cluster.to_owned(),
                reason: NotRunning::NoEndpointFile { file: endpoint_file },
            })
        }
        Err(source) => {
            return Err(CliError::ReadFile {
                file: endpoint_file,
                source,
            })
        }
    };
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
    let cookie_text = std::fs::read_to_string(&cookie_file).map_err(|source| CliError::ReadFile {
        file: cookie_file.clone(),
        source,
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
        let dir = std::env::temp_dir().join(format!("evilcluster-cli-discovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::write(control::endpoint_file(&dir, "stale"), "/nowhere.sock\n4294967295\n").unwrap();
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

        std::fs::write(control::endpoint_file(&dir, "garbled"), "/x.sock\nnot a pid\n").unwrap();
        let error = locate(&dir, "garbled").unwrap_err();
        assert!(matches!(&error, CliError::MalformedFile { .. }), "{error:?}");
        assert_eq!(error.exit_code(), 2);

        let alive = format!("/x.sock\n{}\n", std::process::id());
        std::fs::write(control::endpoint_file(&dir, "live"), alive).unwrap();
        std::fs::write(control::cookie_file(&dir, "live"), "0a0b\n").unwrap();
        let master = locate(&dir, "live").unwrap();
        assert_eq!(master.pid, std::process::id());
        assert_eq!(master.cookie, Cookie::new(vec![10, 11]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
