#!/usr/bin/env bash
# Build the bare host (bare-host.patch) with profile-guided optimisation, as loadtest/pgo.sh
# builds Weir, so that floor.sh compares the shipped build with a floor built the same way:
#
#   bash loadtest/pgo.sh /tmp/weir-pgo
#   loadtest/experiments/bare-pgo.sh /tmp/weir-bare-pgo
#   loadtest/experiments/floor.sh 11 weir=/tmp/weir-pgo bare=/tmp/weir-bare-pgo:WEIR_BARE=1
#
# It copies the committed tree (`git archive HEAD`) to a temporary directory, applies the
# patch there, and runs that copy's pgo.sh with one more training step, bare-train.sh: the bare
# path itself, which `weir-bench train` cannot run. The copy builds from scratch (about half an
# hour on 2 cores) and needs about 8 GB under $TMPDIR; it is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: bare-pgo.sh OUT}")
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git -C "$(git -C "$here" rev-parse --show-toplevel)" archive HEAD | tar -x -C "$src"
patch -d "$src" -p1 --quiet <"$here/bare-host.patch"
PGO_TRAIN_MORE="$here/bare-train.sh" bash "$src/loadtest/pgo.sh" "$out"
