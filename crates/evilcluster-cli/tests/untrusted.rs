//! The command trusts a discovery directory only if it is private to this
//! user (issue 10): another user could otherwise plant a fake endpoint
//! (and collect what root's `evilcluster stop` sends it) or read the cookie.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use evilcluster_wire::control;
use support::{discovery_dir, evilcluster, private_dir, unique_name, write_private};

/// Plausible discovery files for `name` in `dir`: this live process as the
/// master, a socket nobody listens on.
fn plant(dir: &Path, name: &str) {
    write_private(
        control::endpoint_file(dir, name),
        format!("{}\n{}\n", dir.join("nowhere.sock").display(), std::process::id()),
    )
    .unwrap();
    write_private(control::cookie_file(dir, name), "00112233\n").unwrap();
}

fn assert_untrusted(tmp: &Path, name: &str, why: &str) {
    let run = evilcluster(tmp, &["ps", name]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("not trusting") && run.stderr.contains(why),
        "{run:#?}"
    );
}

#[test]
fn a_directory_others_can_write_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("untrusted-mode");
    let dir = discovery_dir(tmp.path());
    private_dir(&dir);
    plant(&dir, &name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_untrusted(tmp.path(), &name, "0777");
}

#[test]
fn a_directory_that_is_a_symlink_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("untrusted-link");
    let elsewhere = tmp.path().join("elsewhere");
    private_dir(&elsewhere);
    plant(&elsewhere, &name);
    std::os::unix::fs::symlink(&elsewhere, discovery_dir(tmp.path())).unwrap();
    assert_untrusted(tmp.path(), &name, "symbolic link");
}

#[test]
fn a_cookie_others_can_read_or_a_linked_endpoint_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let name = unique_name("untrusted-files");
    let dir = discovery_dir(tmp.path());
    private_dir(&dir);
    plant(&dir, &name);
    std::fs::set_permissions(
        control::cookie_file(&dir, &name),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert_untrusted(tmp.path(), &name, "0644");

    let endpoint = control::endpoint_file(&dir, &name);
    let real = tmp.path().join("real.endpoint");
    std::fs::rename(&endpoint, &real).unwrap();
    std::os::unix::fs::symlink(&real, &endpoint).unwrap();
    assert_untrusted(tmp.path(), &name, "symbolic link");
}
