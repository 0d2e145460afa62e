//! The `gateway` command (CONFIG.md): run, `check-config`, `certs dev`.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use gateway::{config::Config, Server};

/// jemalloc returns freed memory to the system in the background.
///
/// glibc's malloc keeps the peak of a burst resident.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Real-time gateway: secure WebSocket and WebTransport on one port"
)]
struct Cli {
    /// Run from this TOML file (without it: dev mode on loopback).
    #[arg(long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Override `listen` (HOST:PORT).
    ///
    /// The host is an IP address or a host name; port 0 picks a free port.
    #[arg(long, env = "GATEWAY_LISTEN", value_parser = gateway::config::parse_listen)]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file; print the first problem with its key.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Certificate tools.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development certificate and key (PEM) and print its SHA-256.
    Dev {
        /// Output directory.
        #[arg(long, default_value = ".gateway")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::from_file(&file) {
            Ok(config) => match check_tls_files(&config) {
                Ok(()) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: tls: {e}", file.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Certs {
            command: CertsCommand::Dev { out },
        }) => match gateway_certs::DevCert::generate().and_then(|c| c.write(&out).map(|()| c)) {
            Ok(cert) => {
                println!("certificate {}", out.join("cert.pem").display());
                println!("key {}", out.join("key.pem").display());
                println!("sha256={}", cert.sha256);
                println!("spki-sha256={}", cert.spki_sha256);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        None => run(cli.config, cli.listen),
    }
}

/// Loads the `[tls]` certificate and key as start-up would.
///
/// Both files must be readable, PEM, a certificate and a private key rustls can sign with.
fn check_tls_files(config: &Config) -> Result<(), gateway_certs::CertError> {
    if let gateway::config::TlsSource::Files { cert, key } = &config.tls {
        gateway::tls::install_crypto_provider();
        let identity = gateway_certs::load_pem(cert, key)?;
        gateway_certs::ReloadableResolver::new(&identity)?;
    }
    Ok(())
}

fn run(config_path: Option<PathBuf>, listen: Option<SocketAddr>) -> ExitCode {
    let mut config = match config_path {
        Some(path) => match Config::from_file(&path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::dev(),
    };
    init_logging(&config.log);
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if config.dev_mode && !config.listen.ip().is_loopback() {
        eprintln!("--listen: dev mode (no --config) only listens on loopback");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let server = match Server::start(config).await {
            Ok(s) => s,
            Err(e) => {
                // With its causes, as `anyhow` chains them.
                eprintln!("error: {:#}", anyhow::Error::new(e));
                return ExitCode::FAILURE;
            }
        };
        // A closed stdout must not take the server down. When stdout and the log (stderr)
        // are both the terminal, the line shows once, as printed.
        let mut stdout = std::io::stdout();
        let one_terminal = stdout.is_terminal() && std::io::stderr().is_terminal();
        for line in server.listener_lines() {
            if !one_terminal {
                tracing::info!("{line}");
            }
            let _ = writeln!(stdout, "{line}");
        }
        let _ = stdout.flush();
        wait_for_shutdown(&server).await;
        tracing::info!("shutting down");
        tokio::select! {
            () = server.shutdown() => ExitCode::SUCCESS,
            () = shutdown_signal() => {
                tracing::warn!("second signal: exiting without waiting for the drain");
                ExitCode::FAILURE
            }
        }
    })
}

/// Logs to stderr as `[log]` says.
///
/// Text or JSON lines, at its level unless `GATEWAY_LOG` sets a filter.
fn init_logging(log: &gateway::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        gateway::config::LogFormat::Text => builder.init(),
        gateway::config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Serves until SIGTERM or Ctrl-C; each SIGHUP reloads the TLS certificate meanwhile.
async fn wait_for_shutdown(server: &Server) {
    #[cfg(unix)]
    {
        use gateway::cert_reload::{CertReload, Trigger};
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = hangup.recv() => {
                    // The outcome is logged by the reload itself.
                    if let Ok(CertReload::DevCertificate) =
                        server.reload_certificate(Trigger::Signal)
                    {
                        tracing::info!("SIGHUP: the development certificate is not reloaded");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = server;
        shutdown_signal().await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
