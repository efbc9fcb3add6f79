//! `weir-bench`: the benchmark runner. See `loadtest/README.md`.

fn main() -> std::process::ExitCode {
    weir_loadtest::bench::main()
}
