#!/usr/bin/env bash
# pgo.sh's extra training step for bare-pgo.sh: WEIR (the instrumented build of the patched
# tree) with WEIR_BARE=1 on filters.yaml, 4 s of each of /f0, /f1 and /f3. Run by pgo.sh from
# the root of the tree it builds, where the load tools are in target/dist/. Fails if any request
# failed, so a broken run trains nothing.
set -euo pipefail
weir=${1:?usage: bare-train.sh WEIR}
here=$(cd "$(dirname "$0")" && pwd)
target/dist/weir-bench-upstream --listen 127.0.0.1:19902 --threads 1 >/dev/null 2>&1 &
up=$!
WEIR_BARE=1 "$weir" run "$here/filters.yaml" --workers 1 >/dev/null 2>&1 &
w=$!
trap 'kill "$w" "$up" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:19901/ready && break; sleep 0.1; done
for path in /f0 /f1 /f3; do
  report=$(target/dist/weir-load --addr 127.0.0.1:19900 --path "$path" -c 16 -d 4s --warmup 1s \
    --no-progress)
  line=${report%%$'\n'*}
  echo "bare-train.sh: $path: $line" >&2
  if ! [[ $line =~ \ [1-9][0-9]*\ ok,\ 0\ non-2xx,\ 0\ errors ]]; then
    echo "bare-train.sh: $path failed" >&2
    exit 1
  fi
done
# weir writes its profile when it exits on SIGTERM.
kill "$w"
wait "$w" || true
