//! The service manager's notify protocol (`sd_notify`), spoken over the `NOTIFY_SOCKET`
//! datagram socket: `READY=1` once listening, `RELOADING=1` with `MONOTONIC_USEC` then
//! `READY=1` around a reload, `STOPPING=1` when draining, and `WATCHDOG=1` keep-alives when
//! `WatchdogSec` is set; after a binary upgrade, `MAINPID` from the new process and nothing more
//! from the old. Outside systemd every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Set once this process handed its service over to the process an upgrade started: from
/// then on that process speaks for the service and this one says nothing.
static SILENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops every later notification from this process.
pub fn silence() {
    SILENT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Sends `state` to the service manager; false when not under systemd, silenced, or the send
/// failed.
pub fn notify(state: &str) -> bool {
    if SILENT.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL byte.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// Every listener is bound: the service is up.
pub fn ready() {
    notify("READY=1");
}

/// A reload starts; systemd 252 wants the monotonic timestamp with it.
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Draining has begun.
pub fn stopping() {
    notify("STOPPING=1");
}

/// The service's main process is now this one (after an upgrade, systemd still knows the
/// parent's pid): `MAINPID` and `READY=1` in one message.
pub fn ready_as_main() {
    notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}

/// The keep-alive period systemd asked for (half of `WatchdogSec`), if it asked this process
/// or `predecessor`, the process this one took over from.
pub fn watchdog_period(predecessor: Option<u32>) -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
        && Some(pid) != predecessor
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `period` for as long as the runtime runs tasks: a wedged runtime
/// stops the pings and systemd restarts the service.
pub async fn watchdog(period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        notify("WATCHDOG=1");
    }
}
