//! `weir-bench`: the runner. For each scenario it starts the benchmark upstream, Weir and each
//! peer with equivalent configurations on loopback, runs the contenders alternately
//! (A B A B ...) for several rounds, and reports each one's figures, its ratio to Weir, and the
//! upstream alone (no proxy) as the ceiling.

pub mod contender;
pub mod install;
pub mod peers;
pub mod process;
pub mod results;
pub mod scenarios;
pub mod spec;
pub mod weir;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cli::{LoadArgs, UpstreamArgs, parse_duration};
use contender::Kind;

/// Benchmarks Weir against nginx, HAProxy, Caddy and Traefik on this machine.
#[derive(Debug, Parser)]
#[command(name = "weir-bench", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Settings shared by the scenarios.
    #[command(flatten)]
    pub opts: BenchOpts,
}

/// Scenarios and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Small response: closed-loop throughput, then an open loop at half of nginx's rate.
    Small,
    /// 1 KiB and 64 KiB bodies.
    Bodies,
    /// TLS termination: keep-alive throughput and full handshakes per second.
    Tls,
    /// 1,000 routes matched by host and path.
    Routes,
    /// Weighted canary (90/10 between two upstream listeners), with the split observed.
    Canary,
    /// Weir with 0, 1 and 3 wasm filters (built-in ones; a variant not shipped yet is skipped).
    Wasm,
    /// A reload every 100 ms under load, failed requests counted.
    Reload,
    /// Resident memory with many idle client connections.
    Idle {
        /// Idle connections to open.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// Every scenario in turn.
    All,
    /// A few seconds, no installs: the upstream alone and Weir (when built); fails on errors.
    Smoke,
    /// Weir alone through every scenario's loads and HTTP/2, one round: the training run of
    /// `loadtest/pgo.sh` (profile-guided optimisation); fails on errors.
    Train,
    /// Run the benchmark upstream (same as `weir-bench-upstream`).
    Upstream(Box<UpstreamArgs>),
    /// Run the load generator (same as `weir-load`).
    Load(Box<LoadArgs>),
}

/// Settings shared by the scenarios.
#[derive(Debug, Clone, Args)]
pub struct BenchOpts {
    /// Measured time of every run.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up before every run, not counted.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Rounds: every contender runs once per round, in turn.
    #[arg(long, global = true, default_value_t = 3)]
    pub rounds: usize,
    /// Client connections of the generator.
    #[arg(long, global = true, default_value_t = 64)]
    pub connections: usize,
    /// Contenders to run (comma-separated); default all.
    #[arg(long, global = true, value_enum, value_delimiter = ',')]
    pub contenders: Vec<Kind>,
    /// Do not install missing peers; skip them.
    #[arg(long, global = true)]
    pub no_install: bool,
    /// Weir's binary (default: `weir` next to this program, then in `target/release`).
    #[arg(long, global = true)]
    pub weir_bin: Option<PathBuf>,
    /// Where results go.
    #[arg(long, global = true, default_value = "bench-results")]
    pub out: PathBuf,
    /// Workers (processes or threads) of every proxy; default: the number of CPUs in
    /// `--cpus-proxy`, else the number of cores.
    #[arg(long, global = true)]
    pub workers: Option<usize>,
    /// Access logs on, to a file, for every proxy alike (default off for all).
    #[arg(long, global = true)]
    pub access_log: bool,
    /// Pin the proxies to these CPUs (`taskset -c` list, e.g. `0`).
    #[arg(long, global = true)]
    pub cpus_proxy: Option<String>,
    /// Pin the upstream to these CPUs.
    #[arg(long, global = true)]
    pub cpus_upstream: Option<String>,
    /// Pin the generator to these CPUs.
    #[arg(long, global = true)]
    pub cpus_load: Option<String>,
    /// Before a scenario, wait up to this long for the machine to be quiet (1-minute load
    /// average below 1), so that other work does not skew the figures; 0 does not wait.
    #[arg(long, global = true, default_value = "0s", value_parser = parse_duration)]
    pub wait_quiet: Duration,
    /// Run every process of the benchmark (generator, upstream, contenders) at this `nice`
    /// priority; negative values (root only) keep other work on the machine from skewing the
    /// figures. 0 leaves priorities alone.
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub nice: i32,
    /// Keep the work directory (configurations and logs) after the run.
    #[arg(long, global = true)]
    pub keep_workdir: bool,
}

/// Runs the command line; the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Upstream(args) => args.execute(),
        Command::Load(args) => args.execute(),
        command => run_scenarios(command, cli.opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_scenarios(command: Command, opts: BenchOpts) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut env = scenarios::Env::new(opts)?;
        let work = async {
            match command {
                Command::Small => scenarios::small(&mut env).await,
                Command::Bodies => scenarios::bodies(&mut env).await,
                Command::Tls => scenarios::tls(&mut env).await,
                Command::Routes => scenarios::routes(&mut env).await,
                Command::Canary => scenarios::canary(&mut env).await,
                Command::Wasm => scenarios::wasm(&mut env).await,
                Command::Reload => scenarios::reload(&mut env).await,
                Command::Idle { count } => scenarios::idle(&mut env, count).await,
                Command::All => scenarios::all(&mut env).await,
                Command::Smoke => scenarios::smoke(&mut env).await,
                Command::Train => scenarios::train(&mut env).await,
                Command::Upstream(_) | Command::Load(_) => unreachable!("handled before"),
            }
        };
        // Ctrl-C or SIGTERM drops the scenario, and with it every process guard.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        let outcome = tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
            _ = term.recv() => Err("terminated".to_string()),
        };
        env.finish();
        outcome.map(|_| ())
    })
}
