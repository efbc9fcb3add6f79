#!/bin/bash
# Alternating rounds of /f0, /f1, /f3 (0, 1 and 3 no-op filters, filters.yaml) against one or
# more weir binaries, weir alone on CPU 1 with one worker, generator and upstream on CPU 0. For
# each binary: the median req/s and weir's CPU per response (perf stat task-clock over 4 s), and
# the filters' cost against /f0 (ratio of medians, and the median of the rounds' own ratios).
#
#   loadtest/experiments/floor.sh ROUNDS LABEL=BIN[:ENV=VALUE] ...
#   loadtest/experiments/floor.sh 9 weir=target/dist/weir bare=/tmp/weir-bare:WEIR_BARE=1
#
# Needs `cargo build --release -p weir-loadtest` (weir-load, weir-bench-upstream), taskset, perf.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(cd "$here/../.." && pwd)/target/release
rounds=$1
shift
out=$(mktemp)
one() { # label bin env path
  local up w
  taskset -c 0 "$bin/weir-bench-upstream" --listen 127.0.0.1:19902 --threads 1 >/dev/null 2>&1 &
  up=$!
  env ${3:-WEIR_FLOOR=1} taskset -c 1 "$2" run "$here/filters.yaml" --workers 1 >/dev/null 2>&1 &
  w=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:19901/ready && break; sleep 0.1; done
  taskset -c 0 "$bin/weir-load" --addr 127.0.0.1:19900 --path "$4" -c 64 -d 6s --warmup 1s \
    --no-progress >"$out.load" 2>&1 &
  sleep 2
  perf stat -x, -e task-clock -p "$w" -o "$out.perf" -- sleep 4
  wait %3 || true
  kill "$w" "$up"
  wait "$w" "$up" 2>/dev/null || true
  local rps ms
  rps=$(grep -A2 'req/s' "$out.load" | tail -1 | awk -F'|' '{gsub(/[ ,]/,"",$3); print $3}')
  ms=$(grep task-clock "$out.perf" | cut -d, -f1)
  echo "$1 $4 $rps $(python3 -c "print('%.2f' % ($ms * 1000 / ($rps * 4)))")" | tee -a "$out"
}
for _ in $(seq 1 "$rounds"); do
  for path in /f0 /f1 /f3; do
    for spec in "$@"; do
      label=${spec%%=*}
      rest=${spec#*=}
      one "$label" "${rest%%:*}" "$([[ $rest == *:* ]] && echo "${rest#*:}")" "$path"
    done
  done
done
python3 - "$out" <<'PY'
import statistics as st, sys
d = {}
for line in open(sys.argv[1]):
    label, path, rps, cpu = line.split()
    d.setdefault(label, {}).setdefault(path, []).append((int(rps), float(cpu)))
for label, runs in d.items():
    f0 = runs["/f0"]
    m0, c0 = st.median(r for r, _ in f0), st.median(c for _, c in f0)
    print(f"{label}: 0 filters {m0:,.0f} req/s, {c0:.2f} us")
    for path, name in (("/f1", "1 no-op filter"), ("/f3", "3 no-op filters")):
        f = runs[path]
        m, c = st.median(r for r, _ in f), st.median(c for _, c in f)
        own = st.median(a[0] / b[0] - 1 for a, b in zip(f, f0))
        print(f"  {name}: {100 * (m / m0 - 1):+.1f} % (rounds' own: {100 * own:+.1f} %), {c - c0:+.2f} us")
PY
rm -f "$out" "$out.load" "$out.perf"
