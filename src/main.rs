use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest and sqlx use rustls; pick its crypto provider before anything connects.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = switchboard::cli::Cli::parse();
    use switchboard::cli::Command;
    let telemetry = if matches!(
        cli.command,
        Command::Sign(_) | Command::Sink(_) | Command::Openapi | Command::Validate(_)
    ) {
        None
    } else {
        match switchboard::telemetry::init() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("switchboard: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    let code = switchboard::cli::run(cli).await;
    if let Some(t) = telemetry {
        // The exporter blocks while flushing; keep that off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    code
}
