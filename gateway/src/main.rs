//! The `weir` command line: parse arguments, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Weir: a WebAssembly-extensible API gateway.
#[derive(Parser)]
#[command(name = "weir", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "Examples:
  weir run configs/quickstart.yaml        serve the quickstart demo on http://127.0.0.1:8080
  weir validate configs/quickstart.yaml   check a config; errors print as FILE:LINE:COL: message
  weir filter check my_filter.wasm        ABI, imports, and whether it runs on Weir and on Envoy
  curl -X POST http://127.0.0.1:9901/reload   reload the config (also on file change or SIGHUP)";

#[derive(Subcommand)]
enum Command {
    /// Serve traffic as CONFIG describes, reloading it on change, SIGHUP or POST /reload.
    Run {
        /// The YAML config file.
        config: PathBuf,
        /// Worker threads serving connections (Envoy's `--concurrency`). Each serves the
        /// connections it accepts from start to end. Default: one per CPU this process may use.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
    },
    /// Check CONFIG; exit 0 if valid, else 1 with one `FILE:LINE:COL: message` line per error.
    Validate {
        /// The YAML config file.
        config: PathBuf,
    },
    /// Work with proxy-wasm filter modules.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
}

#[derive(Subcommand)]
enum FilterCommand {
    /// Report a module's ABI version, imports and exports, whether Weir runs it and whether it
    /// is portable to Envoy. Exit 0: runs on Weir and Envoy; 2: runs on Weir only; 1: Weir
    /// cannot run it.
    Check {
        /// The `.wasm` file.
        module: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match weir::config::check_file(&config).and_then(|c| {
            // Start the plugins too: their `on_configure` may reject the configuration.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async { c.start_plugins() })
        }) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Filter {
            command: FilterCommand::Check { module },
        } => {
            let bytes = match std::fs::read(&module) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", module.display());
                    return ExitCode::FAILURE;
                }
            };
            match weir_wasm_host::check_module(&bytes) {
                Ok(report) => {
                    println!("{}: {report}", module.display());
                    if !report.runs_on_weir {
                        ExitCode::FAILURE
                    } else if report.portable_to_envoy {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(2)
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", module.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config, workers } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            // The control tasks (admin, reloads, health checks, the VMs' timers) run here; the
            // workers that serve traffic get runtimes of their own. Two threads, so the admin
            // API (readiness probes) keeps answering while a reload compiles a wasm module.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("weir-control")
                .enable_all()
                .build()
                .expect("tokio runtime");
            let workers = workers.map_or_else(weir::workers::default_count, usize::from);
            runtime.block_on(async move {
                match weir::Gateway::start_with_workers(&config, workers).await {
                    Ok(gateway) => {
                        gateway.run_until_signal().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
