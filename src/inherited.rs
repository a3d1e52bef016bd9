//! Listening sockets this process was handed instead of binding them: by systemd's socket
//! activation (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), or by the wsgate it replaces on
//! SIGUSR2 ([`crate::upgrade`]), which uses the same variables with `WSGATE_UPGRADE_PARENT`
//! in place of `LISTEN_PID` (a parent cannot know its child's pid before it forks). Taken from
//! the environment once, before the runtime's threads start; matched to `listen`,
//! `listen_plain` and `[admin] listen` entries by local address when the gateway binds; what
//! matches nothing is logged and closed.

use std::net::{SocketAddr, TcpListener};

/// The variable naming the pid of the wsgate that started this one for an upgrade.
pub(crate) const PARENT_VAR: &str = "WSGATE_UPGRADE_PARENT";
/// The variable naming the abstract socket the upgrading parent waits on for "ready".
pub(crate) const READY_VAR: &str = "WSGATE_UPGRADE_READY";
/// An upgrading parent names each socket `<owner>.<kind>` (`:` separates the names). The owner `wsgate-bound` says the
/// parent bound it itself: once the parent is gone the child is its only holder, so the child
/// may shut it down when it drains. Every other inherited socket is also held by the service
/// manager, which keeps queueing connections on it for the next process; shutting it down
/// would refuse them. The kind lets an entry with port 0 find its socket again.
pub(crate) const OWN: &str = "wsgate-bound";
/// The owner part for a socket the service manager also holds.
pub(crate) const SHARED: &str = "inherited";

/// Which entry a socket served in the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tls,
    Plain,
    Admin,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Plain => "plain",
            Kind::Admin => "admin",
        }
    }

    /// The kind of a client listener.
    pub(crate) fn of_listener(k: crate::conn::ListenerKind) -> Kind {
        match k {
            crate::conn::ListenerKind::Tls => Kind::Tls,
            crate::conn::ListenerKind::Plain => Kind::Plain,
        }
    }

    fn of(s: &str) -> Option<Kind> {
        [Kind::Tls, Kind::Plain, Kind::Admin]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// One inherited listening socket.
pub(crate) struct Socket {
    pub(crate) listener: TcpListener,
    pub(crate) local: SocketAddr,
    /// Also held by someone else (the service manager): never shut down, only closed.
    pub(crate) shared: bool,
    /// The entry it served in an upgrading parent.
    pub(crate) kind: Option<Kind>,
}

/// What this process inherited.
#[derive(Default)]
pub struct Inherited {
    pub(crate) sockets: Vec<Socket>,
    /// Set when this process was started by an upgrading wsgate.
    pub(crate) upgrade: Option<UpgradeFrom>,
    /// Why sockets named in the environment were not taken; logged once logging runs.
    pub(crate) notes: Vec<String>,
}

/// The parent of an upgrade.
pub struct UpgradeFrom {
    pub(crate) parent: u32,
    /// Abstract socket name to report readiness on.
    pub(crate) ready: String,
}

impl Inherited {
    /// Nothing inherited: every listener is bound.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes the sockets named by the environment and removes `LISTEN_FDS` and `LISTEN_PID`
    /// from it. Must run before any other thread starts (it edits the environment).
    pub fn from_env() -> Inherited {
        let mut out = Inherited::default();
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let names: Vec<&str> = names.split(':').collect();
        let parent = std::env::var(PARENT_VAR)
            .ok()
            .and_then(|p| p.parse::<u32>().ok());
        let ready = std::env::var(READY_VAR).ok();
        let ppid = Some(std::os::unix::process::parent_id());
        let pid_given = std::env::var("LISTEN_PID").is_ok_and(|p| !p.is_empty());
        out.upgrade = match (parent, ready) {
            (Some(parent), Some(ready)) if Some(parent) == ppid => {
                Some(UpgradeFrom { parent, ready })
            }
            (Some(parent), ready) => {
                out.notes.push(if ready.is_none() {
                    format!("{PARENT_VAR}={parent} without {READY_VAR}; not an upgrade")
                } else {
                    format!("{PARENT_VAR}={parent} is not this process's parent; not an upgrade")
                });
                None
            }
            _ => None,
        };
        if std::env::var_os("LISTEN_FDS").is_none() {
            return out;
        }
        // listenfd takes sockets without a LISTEN_PID unchecked; only our upgrading parent may
        // hand them over that way.
        if !pid_given && out.upgrade.is_none() {
            out.notes
                .push("LISTEN_FDS without LISTEN_PID and not an upgrade: ignored".into());
            return out;
        }
        let upgrading = out.upgrade.is_some();
        let mut fds = listenfd::ListenFd::from_env();
        for i in 0..fds.len() {
            let name = names.get(i).copied().unwrap_or("");
            match fds.take_tcp_listener(i) {
                Ok(Some(listener)) => match listener.local_addr() {
                    Ok(local) => {
                        // Only an upgrading parent names sockets; systemd's names are the
                        // operator's, and its sockets are always shared.
                        let (own, kind) = match name.split_once('.') {
                            Some((owner, kind)) if upgrading => (owner == OWN, Some(kind)),
                            _ => (false, None),
                        };
                        out.sockets.push(Socket {
                            listener,
                            local,
                            shared: !own,
                            kind: kind.and_then(Kind::of),
                        })
                    }
                    Err(e) => out.notes.push(format!(
                        "inherited socket {i} ({name}): no local address: {e}"
                    )),
                },
                Ok(None) => {}
                Err(e) => {
                    // Taken as what it is and dropped, so it does not leak into an upgrade's
                    // child; a descriptor of another kind is left as it is.
                    let closed = matches!(fds.take_unix_listener(i), Ok(Some(_)))
                        || matches!(fds.take_udp_socket(i), Ok(Some(_)));
                    out.notes.push(format!(
                        "inherited socket {i} ({name}) is not a TCP listener ({e}); {}",
                        if closed { "closed" } else { "left alone" }
                    ));
                }
            }
        }
        out
    }

    /// The upgrading parent, when there is one (taken: only the first call gets it).
    pub fn take_upgrade(&mut self) -> Option<UpgradeFrom> {
        self.upgrade.take()
    }

    /// Takes the socket listening on `addr`, if one was inherited; for an entry with port 0
    /// (any port), the one an upgrading parent passed for an entry of that kind on that host.
    pub(crate) fn take(&mut self, addr: SocketAddr, kind: Kind) -> Option<Socket> {
        let i = self
            .sockets
            .iter()
            .position(|s| s.local == addr)
            .or_else(|| {
                (addr.port() == 0).then(|| {
                    self.sockets
                        .iter()
                        .position(|s| s.kind == Some(kind) && s.local.ip() == addr.ip())
                })?
            })?;
        Some(self.sockets.swap_remove(i))
    }

    /// Logs what could not be taken and closes the sockets that matched no entry.
    pub(crate) fn finish(&mut self) {
        for note in self.notes.drain(..) {
            tracing::warn!("{note}");
        }
        for s in self.sockets.drain(..) {
            tracing::warn!(addr = %s.local, "inherited socket matches no listener; closed");
        }
    }
}
