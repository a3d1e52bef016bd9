//! The `wsgate` binary: flags, logging and signals around [`wsgate::Gateway`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use wsgate::config::{Config, LogFormat};
use wsgate::systemd;

/// TLS-terminating WebSocket gateway and reverse proxy.
#[derive(Parser, Debug)]
#[command(name = "wsgate", version, about)]
struct Args {
    /// Configuration file.
    #[arg(long, short = 'c', default_value = wsgate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the configuration and certificates, print `ok` or every error, and exit.
    #[arg(long, short = 't')]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check {
        return check(&args.config);
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    // Before the runtime's threads: taking the sockets edits the environment.
    let inherited = wsgate::Inherited::from_env();
    // Resolved now: once an upgrade replaced the file, /proc/self/exe names the deleted one.
    let exec = wsgate::Exec::current();
    // One worker needs no work-stealing scheduler: the current-thread one wakes tasks cheaper.
    let mut rt = match config.workers() {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(config, inherited, exec)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let errors = wsgate::check(path);
    if errors.is_empty() {
        println!("ok");
        return ExitCode::SUCCESS;
    }
    for line in errors {
        println!("{line}");
    }
    ExitCode::FAILURE
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config.log_level()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // journald stamps each line itself.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (config.log_format(), under_journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

async fn serve(
    config: Config,
    mut inherited: wsgate::Inherited,
    exec: std::io::Result<wsgate::Exec>,
) -> anyhow::Result<()> {
    let predecessor = inherited.take_upgrade();
    let gateway = wsgate::Gateway::bind_with(config, inherited, predecessor.is_none())
        .await
        .context("startup failed")?;
    let handle = gateway.handle();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    if let Some(from) = &predecessor {
        // Accepting nothing until the old process confirms: if it does not, this one exits
        // and no connection it held is lost.
        from.hand_over().await.with_context(|| {
            format!(
                "upgrade: no go-ahead from the old process {}; exiting without serving",
                from.parent()
            )
        })?;
        handle.open(true);
        systemd::ready_as_main();
        tracing::info!(
            parent = from.parent(),
            "upgrade: serving; the old process drains"
        );
    }
    let run = tokio::spawn(gateway.run(std::future::pending()));
    if let Some(period) = systemd::watchdog_period(predecessor.as_ref().map(|p| p.parent())) {
        tokio::spawn(systemd::watchdog(period));
    }
    if predecessor.is_none() {
        systemd::ready();
    }
    let mut upgrading: Option<tokio::task::JoinHandle<Result<u32, wsgate::UpgradeError>>> = None;
    let handed_over = loop {
        tokio::select! {
            _ = hup.recv() => {
                if upgrading.is_some() {
                    // The new process read the file already; listeners this one changed now
                    // would not be the ones it holds.
                    tracing::warn!("SIGHUP ignored during an upgrade; send it to the new process");
                    continue;
                }
                systemd::reloading();
                // A failed reload keeps the old configuration: the service is still up.
                let _ = handle.reload().await;
                systemd::ready();
            }
            _ = usr2.recv() => match (&exec, &upgrading) {
                (_, Some(_)) => tracing::warn!("upgrade already in progress; SIGUSR2 ignored"),
                (Err(e), None) => tracing::error!(error = %e, "upgrade impossible: this executable's path is unknown"),
                (Ok(exec), None) => {
                    tracing::info!(exe = %exec.path().display(), "upgrade: starting the new process");
                    let (h, exec) = (handle.clone(), exec.clone());
                    upgrading = Some(tokio::spawn(async move { h.upgrade(&exec).await }));
                }
            },
            done = async { upgrading.as_mut().expect("guarded").await }, if upgrading.is_some() => {
                upgrading = None;
                match done {
                    Ok(Ok(pid)) => {
                        tracing::info!(pid, "upgrade: the new process serves; draining");
                        break true;
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "upgrade failed; serving on"),
                    Err(e) => tracing::error!(error = %e, "upgrade failed; serving on"),
                }
            }
            _ = term.recv() => break stop_upgrade(upgrading.take()).await,
            _ = int.recv() => break stop_upgrade(upgrading.take()).await,
        }
    };
    if handed_over {
        systemd::silence();
        handle.hand_over();
    }
    handle.drain_configured();
    systemd::stopping();
    let mut run = run;
    loop {
        tokio::select! {
            r = &mut run => {
                r.context("gateway task failed")?;
                break;
            }
            _ = usr2.recv() => tracing::warn!("draining: SIGUSR2 ignored"),
            _ = hup.recv() => tracing::warn!("draining: SIGHUP ignored"),
            _ = term.recv() => {
                tracing::warn!("second signal: exiting now");
                break;
            }
            _ = int.recv() => {
                tracing::warn!("second signal: exiting now");
                break;
            }
        }
    }
    Ok(())
}

/// Told to stop while an upgrade runs: the upgrade is abandoned (its child, not confirmed
/// yet, is killed and had accepted nothing), unless it got as far as the go-ahead, in which
/// case the listeners belong to the new process and this one hands over as planned.
async fn stop_upgrade(
    upgrading: Option<tokio::task::JoinHandle<Result<u32, wsgate::UpgradeError>>>,
) -> bool {
    let Some(h) = upgrading else {
        return false;
    };
    h.abort();
    match h.await {
        Ok(Ok(pid)) => {
            tracing::info!(pid, "stopping: the new process already took over");
            true
        }
        _ => {
            tracing::warn!("stopping during an upgrade: the new process is abandoned");
            false
        }
    }
}
