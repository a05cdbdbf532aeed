#!/usr/bin/env bash
# kvraft with vector-clock tracing on against off, side by side, in one run on this machine.
#
#   bench/compare-tracing.sh [ROUNDS] [OPS] [CONNECTIONS]
#
# Starts two 3-server clusters on loopback with their data in one temporary directory: one with
# `[tracing] enabled = true` and its tracing server, one without. Both run for the whole
# script (the idle one only heartbeats), so a pair of runs differs only in tracing. Runs puts
# at 1 and at 64 in flight (128-byte values, 10,000 keys, CONNECTIONS clients: default 1, as
# `bench` does) with the same `bench` binary, ROUNDS times (default 5) for each cluster, alternating traced / untraced / untraced /
# traced; prints each pair's ratio, and the medians of each and their ratio. Everything it
# started is stopped by process id. Ports below the ephemeral range (32768 here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
OPS=${2:-20000}
CONNECTIONS=${3:-1}

echo "== building (release)"
cargo build --release --bin coord --bin server --bin bench --bin client --bin tracing-server \
  >/dev/null 2>&1
BIN=target/release

# shellcheck source=bench/common.sh
source bench/common.sh kvraft-tracing-cost

# A cluster config: name, port base, tracing section.
config() {
  local dir="$WORK/$1" base=$2
  mkdir -p "$dir"
  cat >"$dir/cluster.toml" <<EOF
[coord]
server_api_addr = "127.0.0.1:$((base + 2))"
client_api_addr = "127.0.0.1:$((base + 9))"
data_dir = "$dir/coord"

[[servers]]
id = 1
addr = "127.0.0.1:$((base + 101))"
data_dir = "$dir/server1"

[[servers]]
id = 2
addr = "127.0.0.1:$((base + 102))"
data_dir = "$dir/server2"

[[servers]]
id = 3
addr = "127.0.0.1:$((base + 103))"
data_dir = "$dir/server3"

[tracing]
enabled = $3
server_addr = "127.0.0.1:$((base + 10))"
output_file = "$dir/trace_output.log"
shiviz_output_file = "$dir/shiviz_output.log"
spool_dir = "$dir/trace-spool"
EOF
}

start() { # name
  local c="$WORK/$1/cluster.toml"
  $BIN/coord --config "$c" >"$WORK/$1/coord.log" 2>&1 &
  PIDS+=($!)
  for i in 1 2 3; do
    $BIN/server "$i" --config "$c" >"$WORK/$1/server$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 200); do
    $BIN/client probe --config "$c" get k >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "the $1 cluster did not come up (logs in $WORK/$1)" >&2
  exit 1
}

echo "== starting a traced cluster (and its tracing server) and an untraced one"
config on 25000 true
config off 25500 false
$BIN/tracing-server --config "$WORK/on/cluster.toml" --fresh >"$WORK/on/tracing-server.log" 2>&1 &
PIDS+=($!)
start on
start off

# One run: prints the throughput of its puts.
run() { # on|off in-flight
  local ops=$OPS
  [ "$2" = 1 ] && ops=$((OPS / 8))
  $BIN/bench --config "$WORK/$1/cluster.toml" --ops "$ops" --concurrency "$2" --connections "$CONNECTIONS" \
    --value-bytes 128 --keys 10000 --warmup-secs 1 2>&1 |
    grep "^bench: ops" | sed -E 's/.*throughput ([0-9]+) ops\/s.*/\1/'
}

printf '\n| puts in flight | pairs, on / off puts/s (ratio) | median on | median off | on / off |\n'
printf '| --- | --- | --- | --- | --- |\n'
for c in 1 64; do
  ON=() OFF=() PAIRS=""
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for t in $order; do
      if [ "$t" = on ]; then on=$(run on "$c"); else off=$(run off "$c"); fi
    done
    ON+=("$on"); OFF+=("$off")
    PAIRS+=$(awk -v a="$on" -v b="$off" 'BEGIN {printf "%s / %s (%.2fx); ", a, b, (b > 0) ? a / b : 0}')
  done
  mon=$(printf '%s\n' "${ON[@]}" | median); moff=$(printf '%s\n' "${OFF[@]}" | median)
  ratio=$(awk -v a="$mon" -v b="$moff" 'BEGIN {printf "%.2fx", (b > 0) ? a / b : 0}')
  printf '| %s | %s | %s | %s | %s |\n' "$c" "${PAIRS%; }" "$mon" "$moff" "$ratio"
done
echo
echo "(bench, 128-byte values, 10,000 keys, $CONNECTIONS connection(s); $ROUNDS pairs per row, alternating)"
