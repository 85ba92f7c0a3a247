use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest and sqlx use rustls; pick its crypto provider before anything connects.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = switchboard::cli::Cli::parse();
    use switchboard::cli::Command;
    if !matches!(
        cli.command,
        Command::Sign(_) | Command::Openapi | Command::Validate(_)
    ) {
        switchboard::telemetry::init();
    }
    switchboard::cli::run(cli).await
}
