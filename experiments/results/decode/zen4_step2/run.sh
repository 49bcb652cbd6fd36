#!/bin/bash
# Interleaved rounds of fresh processes, before / after alternating (before, after, after, before, ...), 1 thread.
# Trees: git archive of each commit into /tmp/<name> (the working tree may hold other people's edits).
#   bash run.sh <rounds> <out dir> before=/tmp/before after=/tmp/after
set -e
rounds=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
declare -a names trees
for kv in "$@"; do names+=("${kv%%=*}"); trees+=("${kv#*=}"); done
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  order=$(seq 0 $((${#names[@]} - 1))); [ $((r % 2)) -eq 0 ] && order=$(echo "$order" | tac)
  for i in $order; do
    n=${names[$i]}; t=${trees[$i]}
    echo "== round $r $n $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    PYTHONPATH="$t:$t/experiments" OMP_NUM_THREADS=1 python "$t/experiments/decode.py" --lengths 1024,4096,16384 \
      --tokens 50 --out "$out/$n-$r" | tail -5
    PYTHONPATH="$t:$t/experiments" OMP_NUM_THREADS=1 python "$here/gen.py" "$out/gen-$n-$r.json"
  done
done
