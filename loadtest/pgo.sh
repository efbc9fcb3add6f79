#!/usr/bin/env bash
# Build weir with profile-guided optimisation (PGO), as the Docker image does:
#   1. the load tools (`weir-bench`), built plainly;
#   2. weir's `dist` build instrumented with -Cprofile-generate (in target/pgo-generate/);
#   3. `weir-bench train`: that weir through every benchmark scenario's loads and HTTP/2, on
#      loopback, one round of a few seconds each (fails on any error, so a broken run never
#      trains a profile);
#   4. the profiles merged with the llvm-profdata of rustc's own LLVM (rustup's llvm-tools);
#   5. weir's `dist` build again with -Cprofile-use.
#
# Usage: bash loadtest/pgo.sh [OUT]    (OUT defaults to target/pgo/weir)
# With PGO_TRAIN_MORE=CMD, step 3 ends with `CMD INSTRUMENTED_WEIR`, run from the repository's
# root with the tools of step 1 in target/dist/ (experiments/bare-pgo.sh trains its own path so).
# Needs: rustup's llvm-tools component (added here if missing) and wasm32-wasip1 (for the
# built-in filters, as in any build). Takes about three times a `dist` build.
# What it gains and costs is measured in loadtest/RESULTS.md ("Profile-guided optimisation").
set -euo pipefail
cd "$(dirname "$0")/.."
# Every path below is under ./target (the instrumented build sets its own directory).
unset CARGO_TARGET_DIR
out=${1:-target/pgo/weir}
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  rustup component add llvm-tools
fi
if [ ! -x "$profdata" ]; then
  echo "pgo.sh: $profdata not found (rustup component add llvm-tools)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "pgo.sh: building the load tools" >&2
cargo build --profile dist --locked -p weir-loadtest

echo "pgo.sh: building an instrumented weir" >&2
CARGO_TARGET_DIR=target/pgo-generate cargo build --profile dist --locked -p weir \
  --target "$host" --config "target.$host.rustflags=['-Cprofile-generate=$work/raw']"

echo "pgo.sh: training it" >&2
# One file per process (a process killed before it exits writes none).
LLVM_PROFILE_FILE="$work/raw/weir-%p.profraw" \
  target/dist/weir-bench train --weir-bin "$PWD/target/pgo-generate/$host/dist/weir" \
  --duration 3s --warmup 1s --out "$work/results" >"$work/train.md"
if [ -n "${PGO_TRAIN_MORE:-}" ]; then
  echo "pgo.sh: more training: $PGO_TRAIN_MORE" >&2
  LLVM_PROFILE_FILE="$work/raw/weir-%p.profraw" \
    "$PGO_TRAIN_MORE" "$PWD/target/pgo-generate/$host/dist/weir"
fi
n=$(find "$work/raw" -name '*.profraw' | wc -l)
if [ "$n" -eq 0 ]; then
  echo "pgo.sh: the training wrote no profiles" >&2
  exit 1
fi
"$profdata" merge -o "$work/weir.profdata" "$work/raw"
echo "pgo.sh: merged the profiles of $n weir processes" >&2

echo "pgo.sh: building weir with the profile" >&2
cargo build --profile dist --locked -p weir \
  --target "$host" --config "target.$host.rustflags=['-Cprofile-use=$work/weir.profdata']"
mkdir -p "$(dirname "$out")"
cp "target/$host/dist/weir" "$out"
echo "pgo.sh: wrote $out" >&2
