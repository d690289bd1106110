#!/usr/bin/env bash
# Soak: the seven-engine demo on three private redis-servers (market data, engine, main) for
# SECONDS (default 600), sampling every 10 s the demo's resident memory, each server's memory
# and, on the engine server, the entries held in busway streams and pending in their groups.
# Usage: [SOAK_CONFIG=examples/demo-redis-stream.toml] scripts/soak.sh [SECONDS] [extra busway demo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}; shift || true
cargo build -q --release -p busway-cli
bin=${CARGO_TARGET_DIR:-target}/release/busway
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A ports
for bus in marketdata engine main; do
  p=$(port); ports[$bus]=$p
  redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/$bus.log" --daemonize no & pids+=($!)
done
for bus in marketdata engine main; do
  until redis-cli -p "${ports[$bus]}" ping >/dev/null 2>&1; do sleep 0.1; done
done
BUSWAY_BUS_MARKETDATA_URL="redis://127.0.0.1:${ports[marketdata]}" \
BUSWAY_BUS_ENGINE_URL="redis://127.0.0.1:${ports[engine]}" \
BUSWAY_BUS_MAIN_URL="redis://127.0.0.1:${ports[main]}" \
  "$bin" demo --config "${SOAK_CONFIG:-examples/demo-redis.toml}" --seconds "$seconds" "$@" > "$dir/demo.out" 2>&1 &
demo=$!; pids+=($demo)
sleep 5
echo "elapsed_s rss_kib redis_used_memory_kib(marketdata,engine,main) engine_stream_entries engine_group_pending"
start=$(date +%s)
while kill -0 "$demo" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$demo/status" 2>/dev/null || echo -)
  mem=""
  for bus in marketdata engine main; do
    m=$(redis-cli -p "${ports[$bus]}" info memory | awk -F: '/^used_memory:/ {printf "%d", $2/1024}')
    mem="$mem $m"
  done
  entries=0; pending=0
  for key in $(redis-cli -p "${ports[engine]}" --scan --pattern 'busway:stream:*'); do
    [ "$(redis-cli -p "${ports[engine]}" type "$key")" = stream ] || continue
    entries=$(( entries + $(redis-cli -p "${ports[engine]}" xlen "$key") ))
    for n in $(redis-cli -p "${ports[engine]}" xinfo groups "$key" | awk 'prev == "pending" {print} {prev = $0}'); do
      pending=$(( pending + n ))
    done
  done
  [ "$rss" != "-" ] && echo "$(( $(date +%s) - start + 5 )) $rss$mem $entries $pending"
  sleep 10
done
wait "$demo" || true
cat "$dir/demo.out"
