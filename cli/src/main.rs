//! The `busway` command.

mod bench;

use clap::{Parser, Subcommand};

/// Route a platform's messages to named buses: inspect, exercise and measure them.
#[derive(Debug, Parser)]
#[command(name = "busway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure a transport beside its raw client on the same broker, in the same run.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("busway: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
