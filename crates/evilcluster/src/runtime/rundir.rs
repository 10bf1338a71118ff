//! The master's claim on its cluster's name: the private discovery
//! directory, the lock that proves the master alive, the files through which
//! tools find it, and the directory of the cluster's sockets.
//!
//! ```text
//! <discovery dir>/            0700, this user's, verified (not a link)
//!   <cluster>.lock            flock'ed by the live master; holds its pid
//!   <cluster>.endpoint        master socket + pid   (written atomically)
//!   <cluster>.cookie          the cookie, hex, 0600 (written atomically)
//!   <cluster>.run/            0700: every socket of the cluster
//! ```
//!
//! Liveness is the lock, not a pid: a pid may be reused by any process, a
//! lock dies with its holder. Whoever takes the lock of a name therefore
//! knows that everything else of that name is a dead master's leftovers.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use evilcluster_wire::control::{self, Untrusted};
use evilcluster_wire::Cookie;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::Error;

/// Held by the master for its whole life; [`close`](Self::close) (or drop)
/// removes its files.
pub(crate) struct RunDir {
    cluster: String,
    path: PathBuf,
    dir: OwnedFd,
    /// The locked lock file: the proof of life. Closing it releases the lock.
    lock: Option<File>,
    /// Where the cluster's sockets go.
    pub sockets: PathBuf,
}

fn io(context: impl Into<String>, error: Errno) -> Error {
    Error::io(context, error.into())
}

impl RunDir {
    /// Claims `cluster` for this process: refuses if the discovery directory
    /// is not private, or if a live master holds the name; removes a dead
    /// master's leftovers; creates the socket directory.
    pub fn claim(cluster: &str) -> Result<RunDir, Error> {
        let uid = rustix::process::getuid().as_raw();
        let path = control::discovery_dir(uid);
        let dir = control::open_private_dir(&path, uid, true)?;
        let lock = lock(&dir, &path, cluster, uid)?;
        let run = RunDir {
            cluster: cluster.to_owned(),
            sockets: control::run_dir(&path, cluster),
            path,
            dir,
            lock: Some(lock),
        };
        // The lock is ours: whatever else carries this name is a dead
        // master's (its sockets, endpoint and cookie).
        run.remove_files();
        let sockets = format!("{cluster}.run");
        rustix::fs::mkdirat(&run.dir, sockets.as_str(), Mode::RWXU)
            .map_err(|e| io(format!("cannot create {}", run.sockets.display()), e))?;
        let opened = rustix::fs::openat(
            &run.dir,
            sockets.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io(format!("cannot open {}", run.sockets.display()), e))?;
        // mkdir applied the umask, which can only take permissions away.
        control::check_private(&opened, &run.sockets, uid, FileType::Directory)?;
        Ok(run)
    }

    /// Advertises the master's socket and the cookie to tools, each file
    /// written whole under a temporary name, then renamed into place: a
    /// reader sees the old file or the new one, never a part, and a link
    /// planted under the final name is replaced, not followed.
    pub fn publish(&self, socket: &str, cookie: &Cookie) -> Result<(), Error> {
        self.write(
            &format!("{}.cookie", self.cluster),
            &format!("{}\n", hex::encode(cookie.as_bytes())),
        )?;
        self.write(
            &format!("{}.endpoint", self.cluster),
            &control::endpoint_text(socket, std::process::id()),
        )
    }

    fn write(&self, name: &str, text: &str) -> Result<(), Error> {
        let target = self.path.join(name);
        let context = || format!("cannot write {}", target.display());
        let temporary = format!(
            ".{name}.{}",
            hex::encode(crate::supervision::process::random_incarnation().to_ne_bytes())
        );
        // EXCL|NOFOLLOW: a fresh file of ours, never something planted.
        let file = rustix::fs::openat(
            &self.dir,
            temporary.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| io(context(), e))?;
        let written = File::from(file).write_all(text.as_bytes());
        let renamed = written.map_err(|e| Error::io(context(), e)).and_then(|()| {
            rustix::fs::renameat(&self.dir, temporary.as_str(), &self.dir, name).map_err(|e| io(context(), e))
        });
        if renamed.is_err() {
            let _ = rustix::fs::unlinkat(&self.dir, temporary.as_str(), AtFlags::empty());
        }
        renamed
    }

    /// Removes this cluster's endpoint, cookie and socket directory.
    fn remove_files(&self) {
        for suffix in ["endpoint", "cookie"] {
            let _ = rustix::fs::unlinkat(
                &self.dir,
                format!("{}.{suffix}", self.cluster).as_str(),
                AtFlags::empty(),
            );
        }
        // std's remove_dir_all does not follow links; the directory is ours.
        let _ = std::fs::remove_dir_all(&self.sockets);
    }

    /// Removes every file of the claim, then releases the name.
    pub fn close(mut self) -> Result<(), Error> {
        self.release();
        Ok(())
    }

    fn release(&mut self) {
        let Some(lock) = self.lock.take() else { return };
        self.remove_files();
        // Removed while still locked: a master starting now either locks
        // this file before it goes (and then sees it replaced, and retries)
        // or creates a new one.
        let _ = rustix::fs::unlinkat(&self.dir, format!("{}.lock", self.cluster).as_str(), AtFlags::empty());
        drop(lock);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        self.release();
    }
}

/// Takes the lock of `cluster`, or says which master holds it.
fn lock(dir: &OwnedFd, dir_path: &Path, cluster: &str, uid: u32) -> Result<File, Error> {
    let name = format!("{cluster}.lock");
    let path = control::lock_file(dir_path, cluster);
    let context = || format!("cannot lock {}", path.display());
    loop {
        let fd = match rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::RUSR | Mode::WUSR,
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => return Err(Untrusted::Symlink { path }.into()),
            Err(error) => return Err(io(context(), error)),
        };
        control::check_private(&fd, &path, uid, FileType::RegularFile)?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = File::from(fd).read_to_string(&mut text);
                return Err(Error::NameTaken {
                    cluster: cluster.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(error) => return Err(io(context(), error)),
        }
        // The previous holder may have removed the file between our open
        // and our lock: then we hold a lock on a file nobody else will
        // open. Only the file still at the path counts.
        let held = rustix::fs::fstat(&fd).map_err(|e| io(context(), e))?;
        match rustix::fs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_ino == held.st_ino && now.st_dev == held.st_dev => {}
            Ok(_) | Err(Errno::NOENT) => continue,
            Err(error) => return Err(io(context(), error)),
        }
        let mut file = File::from(fd);
        file.set_len(0).map_err(|e| Error::io(context(), e))?;
        file.rewind().map_err(|e| Error::io(context(), e))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(|e| Error::io(context(), e))?;
        return Ok(file);
    }
}
