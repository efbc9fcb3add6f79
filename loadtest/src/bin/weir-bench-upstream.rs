//! `weir-bench-upstream`: the fast benchmark upstream. See `loadtest/README.md`.

use clap::Parser;
use weir_loadtest::cli::UpstreamArgs;

/// HTTP/1.1 + h2c server answering fixed bodies: `/size/N` gives N bytes.
#[derive(Debug, Parser)]
#[command(name = "weir-bench-upstream", version)]
struct Cli {
    #[command(flatten)]
    upstream: UpstreamArgs,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().upstream.execute() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-bench-upstream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
