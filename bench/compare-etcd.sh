#!/usr/bin/env bash
# kvraft against etcd, side by side, in one run on this machine.
#
#   bench/compare-etcd.sh [ROUNDS] [OPS]
#
# Installs etcd from the Debian package (etcd-server) if `etcd` is missing, starts 3 etcd members
# and 3 kvraft servers (plus the coord) on loopback with their data in one temporary directory
# (same disk), and runs the matrix with the same `bench` binary for both: puts at 1, 64 and 256
# in flight and linearizable gets at 256, 128-byte values over 10,000 keys. Each workload runs
# ROUNDS times (default 2) for each system, alternating etcd / kvraft / kvraft / etcd, and the
# table shows the median throughput and p99 of each and the ratio kvraft / etcd. Everything it
# started is stopped by process id. Durability is the same: etcd fsyncs its WAL before
# acknowledging, kvraft fsyncs its log on a majority.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
OPS=${2:-20000}

if ! command -v etcd >/dev/null; then
  echo "== installing etcd (Debian package etcd-server)"
  apt-get install -y etcd-server >/dev/null
fi
echo "== building (release)"
cargo build --release --bin coord --bin server --bin bench --bin client >/dev/null 2>&1
BIN=target/release

# shellcheck source=bench/common.sh
source bench/common.sh kvraft-vs-etcd

# Ports below the ephemeral range (32768 here).
E_CLIENT=(24379 24381 24383)
E_PEER=(24380 24382 24384)
CLUSTER="e1=http://127.0.0.1:${E_PEER[0]},e2=http://127.0.0.1:${E_PEER[1]},e3=http://127.0.0.1:${E_PEER[2]}"
echo "== starting 3 etcd members"
for i in 0 1 2; do
  n=$((i + 1))
  etcd --name "e$n" --data-dir "$WORK/etcd$n" \
    --listen-client-urls "http://127.0.0.1:${E_CLIENT[$i]}" \
    --advertise-client-urls "http://127.0.0.1:${E_CLIENT[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${E_PEER[$i]}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${E_PEER[$i]}" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new \
    --log-level error >"$WORK/etcd$n.log" 2>&1 &
  PIDS+=($!)
done
ETCD="127.0.0.1:${E_CLIENT[0]},127.0.0.1:${E_CLIENT[1]},127.0.0.1:${E_CLIENT[2]}"

echo "== starting kvraft (coord + 3 servers)"
cat >"$WORK/kvraft.toml" <<EOF
[coord]
server_api_addr = "127.0.0.1:24002"
client_api_addr = "127.0.0.1:24009"
data_dir = "$WORK/coord"

[[servers]]
id = 1
addr = "127.0.0.1:24101"
data_dir = "$WORK/server1"

[[servers]]
id = 2
addr = "127.0.0.1:24102"
data_dir = "$WORK/server2"

[[servers]]
id = 3
addr = "127.0.0.1:24103"
data_dir = "$WORK/server3"
EOF
C="$WORK/kvraft.toml"
$BIN/coord --config "$C" >"$WORK/coord.log" 2>&1 &
PIDS+=($!)
for i in 1 2 3; do
  $BIN/server "$i" --config "$C" >"$WORK/server$i.log" 2>&1 &
  PIDS+=($!)
done

# Both up: a kvraft get answers, an etcd put answers (bench with one op).
for _ in $(seq 1 200); do
  $BIN/client probe --config "$C" get k >/dev/null 2>&1 && break
  sleep 0.1
done
for _ in $(seq 1 200); do
  $BIN/bench --etcd "$ETCD" --ops 1 --concurrency 1 >/dev/null 2>&1 && break
  sleep 0.1
done

# One run: prints "<throughput> <p99 ms>" of its main operation.
run() { # system workload
  local target=(--config "$C")
  [ "$1" = etcd ] && target=(--etcd "$ETCD")
  local c=${2#*-} op=${2%-*} rf=0
  [ "$op" = get ] && rf=1.0
  local ops=$OPS
  [ "$c" = 1 ] && ops=$((OPS / 8))
  local line
  line=$($BIN/bench "${target[@]}" --ops "$ops" --concurrency "$c" --connections 4 \
    --read-fraction "$rf" --value-bytes 128 --keys 10000 --warmup-secs 1 2>&1 | grep "^bench: ops")
  local tput p99
  tput=$(sed -E 's/.*throughput ([0-9]+) ops\/s.*/\1/' <<<"$line")
  p99=$(sed -E "s/.*${op} p50 [0-9.]+ ms p99 ([0-9.]+) ms.*/\1/" <<<"$line")
  echo "$tput $p99"
}

# Fill the key space once on each, so reads find values.
run etcd put-256 >/dev/null
run kvraft put-256 >/dev/null

printf '\n| workload | etcd ops/s (p99 ms) | kvraft ops/s (p99 ms) | kvraft / etcd |\n| --- | --- | --- | --- |\n'
for w in put-1 put-64 put-256 get-256; do
  E_T=() E_P=() K_T=() K_P=()
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="etcd kvraft"; else order="kvraft etcd"; fi
    for s in $order; do
      read -r t p < <(run "$s" "$w")
      if [ "$s" = etcd ]; then E_T+=("$t"); E_P+=("$p"); else K_T+=("$t"); K_P+=("$p"); fi
    done
  done
  et=$(printf '%s\n' "${E_T[@]}" | median); ep=$(printf '%s\n' "${E_P[@]}" | median)
  kt=$(printf '%s\n' "${K_T[@]}" | median); kp=$(printf '%s\n' "${K_P[@]}" | median)
  ratio=$(awk -v k="$kt" -v e="$et" 'BEGIN {printf "%.2fx", (e > 0) ? k / e : 0}')
  case $w in
    put-*) label="put, ${w#put-} in flight" ;;
    get-*) label="linearizable get, ${w#get-} in flight" ;;
  esac
  printf '| %s | %s (%s) | %s (%s) | %s |\n' "$label" "$et" "$ep" "$kt" "$kp" "$ratio"
done
echo
echo "(medians of $ROUNDS runs each, alternating; 128-byte values, 10,000 keys, 4 connections)"
