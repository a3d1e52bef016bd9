//! The live binary upgrade (SIGUSR2), both ends. The parent starts the executable now at its
//! own path with its own arguments and a duplicate of every listening socket (as
//! `LISTEN_FDS`, so the child takes them through [`crate::inherited`] like systemd's), then
//! waits for the child to say `READY=1` on an abstract unix socket, believing only a peer
//! whose pid is the child's. The child says so once it has loaded its configuration and bound
//! or taken every listener, but accepts nothing yet; the parent answers `GO`, after which it
//! never kills the child, and stops accepting; the child then accepts and speaks for the
//! service. Until `GO` the parent serves as before; a child that exits, or stays silent for
//! [`READY_WITHIN`], is killed (having accepted nothing) and the upgrade counted as failed.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::inherited::{PARENT_VAR, READY_VAR, UpgradeFrom};
use crate::listener::Listeners;

/// How long a new process has to become ready.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// What the child sends once it could serve.
const READY: &[u8] = b"READY=1\n";
/// The parent's answer: the child is the successor.
const GO: &[u8] = b"GO\n";

/// The executable and arguments to start again, captured when the process starts (the path
/// is resolved then: after the file is replaced, `/proc/self/exe` names the deleted one).
#[derive(Clone, Debug)]
pub struct Exec {
    path: PathBuf,
    args: Vec<OsString>,
}

impl Exec {
    /// The executable's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// This process's executable and arguments. The path is the one it was started by when
    /// that names a file (so a symlink switched to a new release is followed), else the
    /// resolved executable.
    pub fn current() -> io::Result<Exec> {
        let mut args = std::env::args_os();
        let started_as = args.next().map(PathBuf::from);
        let path = match started_as {
            Some(p) if p.components().count() > 1 => std::env::current_dir()?.join(p),
            _ => std::env::current_exe()?,
        };
        Ok(Exec {
            path,
            args: args.collect(),
        })
    }
}

/// Why an upgrade did not happen.
#[derive(Debug)]
pub enum UpgradeError {
    /// The listening sockets could not be duplicated or the child not started.
    Start(io::Error),
    /// The child exited before it was ready.
    Exited(ExitStatus),
    /// The child was not ready in time; it was killed.
    NotReady,
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Start(e) => write!(f, "cannot start the new process: {e}"),
            UpgradeError::Exited(s) => {
                write!(f, "the new process exited before it was ready ({s})")
            }
            UpgradeError::NotReady => write!(
                f,
                "the new process was not ready within {}s; killed",
                READY_WITHIN.as_secs()
            ),
        }
    }
}

impl std::error::Error for UpgradeError {}

/// Starts the new process with this one's listeners and waits until it is ready; returns
/// its pid. On any failure the child is gone and nothing here changed.
pub(crate) async fn start(listeners: &Listeners, exec: &Exec) -> Result<u32, UpgradeError> {
    let me = std::process::id();
    let name = format!(
        "wsgate-upgrade-{me}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let ready = std::os::unix::net::UnixListener::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(UpgradeError::Start)?,
    )
    .and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(l)
    })
    .map_err(UpgradeError::Start)?;
    let sockets = listeners.duplicates().map_err(UpgradeError::Start)?;
    let names: Vec<&str> = sockets.iter().map(|(_, n)| n.as_str()).collect();
    let mut cmd = tokio::process::Command::new(&exec.path);
    cmd.args(&exec.args)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS_FIRST_FD")
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(PARENT_VAR, me.to_string())
        .env(READY_VAR, &name);
    if std::env::var_os("WATCHDOG_USEC").is_some() {
        // systemd named the first process; each successor hands the watchdog on by name.
        cmd.env("WATCHDOG_PID", me.to_string());
    }
    let mappings = sockets
        .into_iter()
        .zip(3..)
        .map(|((fd, _), child_fd)| FdMapping {
            parent_fd: fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings)
        .map_err(|e| UpgradeError::Start(io::Error::other(e)))?;
    let mut child = Armed(Some(cmd.spawn().map_err(UpgradeError::Start)?));
    // The duplicates go with the command: the child has its own now.
    drop(cmd);
    let Some(pid) = child.get().id() else {
        let status = child.get().wait().await.map_err(UpgradeError::Start)?;
        return Err(UpgradeError::Exited(status));
    };
    let said_ready = async {
        loop {
            let mut s = match ready.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, say: try again without spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Anyone on this machine can connect to an abstract socket: only the child counts.
            if s.peer_cred().ok().and_then(|c| c.pid()) != Some(pid as i32) {
                continue;
            }
            let mut buf = [0u8; READY.len()];
            let read = tokio::time::timeout(READY_WITHIN, s.read_exact(&mut buf)).await;
            if matches!(read, Ok(Ok(_))) && buf == READY {
                return s;
            }
        }
    };
    tokio::select! {
        ready = tokio::time::timeout(READY_WITHIN, said_ready) => {
            let Ok(mut s) = ready else {
                return Err(UpgradeError::NotReady);
            };
            // From here the child is the successor: never killed by this process. Without
            // the GO it exits by itself, having accepted nothing.
            child.0 = None;
            s.write_all(GO).await.map_err(UpgradeError::Start)?;
            Ok(pid)
        }
        status = child.get().wait() => {
            Err(status.map_or_else(UpgradeError::Start, UpgradeError::Exited))
        }
    }
}

/// The child until it is ready: killed when dropped (the upgrade failed, or was abandoned
/// because this process was told to stop meanwhile).
struct Armed(Option<tokio::process::Child>);

impl Armed {
    fn get(&mut self) -> &mut tokio::process::Child {
        self.0.as_mut().expect("armed until ready")
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // Reaped by tokio once it has exited.
            let _ = c.start_kill();
        }
    }
}

impl UpgradeFrom {
    /// The pid of the process this one replaces.
    pub fn parent(&self) -> u32 {
        self.parent
    }

    /// Tells the parent this process is ready and waits for its go-ahead: once this returns
    /// `Ok`, the parent has let go and this process must start accepting. An error means
    /// this process is not the successor and must exit without serving.
    pub async fn hand_over(&self) -> io::Result<()> {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(self.ready.as_bytes())?;
        let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
        s.set_nonblocking(true)?;
        let mut s = tokio::net::UnixStream::from_std(s)?;
        s.write_all(READY).await?;
        let mut buf = [0u8; GO.len()];
        tokio::time::timeout(READY_WITHIN, s.read_exact(&mut buf))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "no go-ahead from the old process")
            })??;
        if buf != GO {
            return Err(io::Error::other("unexpected answer from the old process"));
        }
        Ok(())
    }
}
