//! `weir-load`: the load generator. See `loadtest/README.md`.

use clap::Parser;
use weir_loadtest::cli::LoadArgs;

/// HTTP load generator: closed or open loop, HTTP/1.1, h2c or TLS, HDR latency percentiles.
#[derive(Debug, Parser)]
#[command(name = "weir-load", version)]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().load.execute() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
