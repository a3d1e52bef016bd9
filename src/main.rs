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
    match rt.block_on(serve(config)) {
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let gateway = wsgate::Gateway::bind(config)
        .await
        .context("startup failed")?;
    let handle = gateway.handle();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let run = tokio::spawn(gateway.run(std::future::pending()));
    if let Some(period) = systemd::watchdog_period() {
        tokio::spawn(systemd::watchdog(period));
    }
    systemd::ready();
    loop {
        tokio::select! {
            _ = hup.recv() => {
                systemd::reloading();
                // A failed reload keeps the old configuration: the service is still up.
                let _ = handle.reload().await;
                systemd::ready();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    handle.drain_configured();
    systemd::stopping();
    tokio::select! {
        r = run => r.context("gateway task failed")?,
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    Ok(())
}
