//! `plexus serve`: load and check the configuration, raise limits, run the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use plexus::{Config, ConfigError, Server};
use tracing::{info, warn};

use crate::logging::{self, LogFormat};
use crate::EXIT_USAGE;

/// Descriptors kept for listeners, logs and the acceptor's spare, beyond one per session.
const DESCRIPTOR_HEADROOM: u64 = 64;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Configuration file (TOML); without it the embedded default runs.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 = valid, 2 = problems, one per line).
    #[arg(long)]
    check: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

pub(crate) fn run(args: ServeArgs) -> ExitCode {
    let (config, source) = match &args.config {
        Some(path) => (Config::load(path), path.display().to_string()),
        None => (
            Ok(Config::embedded_default()),
            "<embedded default>".to_owned(),
        ),
    };
    let config = match config {
        Ok(config) => config,
        Err(err) => return config_failure(&err),
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let builder = Server::builder(config)
        .source_name(&source)
        .handle_signals(true);
    if args.check {
        return match builder.validate() {
            Ok(valid) => {
                eprintln!(
                    "{source}: configuration ok ({} listeners)",
                    valid.listeners.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => config_failure(&err),
        };
    }

    logging::init(args.log_format);
    raise_descriptor_limit(
        builder
            .validate()
            .map_or(0, |v| v.config.server.max_connections),
    );
    let server = match builder.build() {
        Ok(server) => server,
        Err(plexus::Error::Config(err)) => return config_failure(&err),
        Err(err @ plexus::Error::Tls(_)) => {
            eprintln!("error: {source}: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn config_failure(err: &ConfigError) -> ExitCode {
    for line in err.to_string().lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_USAGE)
}

/// Raises the soft descriptor limit to the hard one and says whether it covers the sessions.
fn raise_descriptor_limit(max_connections: usize) {
    match plexus_sys::rlimit::raise_nofile_to_hard() {
        Ok(limit) => {
            info!(
                soft = limit.soft,
                hard = limit.hard,
                "open file limit (RLIMIT_NOFILE)"
            );
            let wanted = max_connections as u64 + DESCRIPTOR_HEADROOM;
            if limit.soft < wanted {
                warn!(
                    "open file limit {} is below max_connections + {DESCRIPTOR_HEADROOM} ({wanted}); \
                     connections beyond it are closed on arrival (descriptors exhausted)",
                    limit.soft
                );
            }
        }
        Err(err) => warn!("cannot raise the open file limit: {err}"),
    }
}
