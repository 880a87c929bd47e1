#!/usr/bin/env bash
# The standard benchmark matrix, on this machine, everything on loopback:
# PostgreSQL (synchronous_commit on), the three participants and the
# orchestrator in release mode (started by deploy/local.sh on fresh
# databases), and sagactl bench as the load generator.
#
#   bash bench/run.sh NAME       # writes bench/runs/NAME.md and bench/runs/NAME.jsonl
#   SKIP_PGBENCH=1 bash bench/run.sh NAME   # without the pgbench phase
#
# Phases: closed loop at C = 1, 16, 64,
# an open-loop spike at 2x the measured C=64 capacity against a small
# in-flight bound (to show shedding), and the orchestrator's RSS with 10,000
# sagas in flight (shipments held back by a fault), then pgbench -N (the
# commit-rate ceiling).
set -euo pipefail
cd "$(dirname "$0")/.."

server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
name=${1:-last}
mkdir -p bench/runs
out_md=bench/runs/$name.md
out_json=bench/runs/$name.jsonl
: >"$out_json"
export RUST_LOG=warn DB_PREFIX=bench_
export ORCHESTRATOR_PORT=50151 INVENTORY_PORT=50161 PAYMENT_PORT=50162 FULFILLMENT_PORT=50163
O=http://127.0.0.1:$ORCHESTRATOR_PORT
sagactl=target/release/sagactl
# CPU time the hypervisor took from this machine (steal), in seconds: on a
# shared host it varies from run to run and explains most of the spread.
steal() { awk '/^cpu / {print $9}' /proc/stat; }
bench() {
  local before line
  before=$(steal)
  line=$("$sagactl" --endpoint "$O" bench --inventory-url "http://127.0.0.1:$INVENTORY_PORT" \
    --payment-url "http://127.0.0.1:$PAYMENT_PORT" --quiet --output json "$@" | tail -1)
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["steal_seconds"]=(int(sys.argv[3])-int(sys.argv[2]))/100; print(json.dumps(d))' \
    "$line" "$before" "$(steal)"
}

cargo build --release --quiet --bins

fresh_databases() {
  for s in inventory payment fulfillment orchestrator; do
    psql "$server/postgres" -qc "DROP DATABASE IF EXISTS ${DB_PREFIX}$s WITH (FORCE)"
  done
}
system=""
start_system() {
  fresh_databases
  bash deploy/local.sh >/tmp/bench-system.log 2>&1 &
  system=$!
  for _ in $(seq 1 600); do
    grpcurl -plaintext -d '{"service":"saga.v1.OrderService"}' "127.0.0.1:$ORCHESTRATOR_PORT" \
      grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING && return 0
    sleep 0.2
  done
  echo "the system did not start"; tail -20 /tmp/bench-system.log; exit 1
}
stop_system() { kill -TERM "$system" 2>/dev/null || true; wait "$system" 2>/dev/null || true; }
trap 'stop_system; fresh_databases' EXIT


start_system
for run in "1 1000" "16 4000" "64 8000"; do
  set -- $run
  echo "== closed loop C=$1 N=$2"
  bench --concurrency "$1" --orders "$2" | tee -a "$out_json"
done
capacity=$(tail -1 "$out_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sagas_per_second"])')
stop_system

echo "== spike: open loop at 2x capacity ($capacity sagas/s) for 10s, in-flight bound 1000"
ORCHESTRATOR_MAX_IN_FLIGHT=1000 start_system
rate=$(python3 -c "print(round(2 * $capacity))")
bench --rate "$rate" --duration 10s | tee -a "$out_json"
stop_system

echo "== RSS with 10,000 sagas in flight (Ship held back, long step timeout)"
ORCHESTRATOR_STEP_TIMEOUT=600s start_system
grpcurl -plaintext -d '{"rpc":"Ship","mode":"DELAY","latency_ms":600000}' "127.0.0.1:$FULFILLMENT_PORT" \
  fault.v1.FaultInjection/SetFault >/dev/null
orchestrator_pid=$(pgrep -f "release/orchestrator serve --listen 127.0.0.1:$ORCHESTRATOR_PORT")
rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$orchestrator_pid/status")
bench --rate 1000 --duration 10s --no-follow >/dev/null
# Every placed saga is now either still loading (reserving, charging) or
# waiting at Ship; sample while they settle there.
peak=0; in_flight=0
for _ in $(seq 1 20); do
  sleep 1
  now=$("$sagactl" --endpoint "$O" stats --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["in_flight"])')
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$orchestrator_pid/status")
  [ "$rss" -gt "$peak" ] && peak=$rss
  [ "$now" -gt "$in_flight" ] && in_flight=$now
done
echo "{\"rss\":{\"in_flight\":$in_flight,\"rss_kib_idle\":$rss_before,\"rss_kib_peak\":$peak}}" | tee -a "$out_json"
stop_system

# Last, so that its load (a million rows written, then checkpointed) does
# not weigh on the runs above.
if [ -z "${SKIP_PGBENCH:-}" ]; then
echo "== pgbench -N (synchronous_commit on)"
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS bench_pgbench" -c "CREATE DATABASE bench_pgbench"
pgbench -q -i -s 10 "$server/bench_pgbench" >/dev/null 2>&1
pg1=$(pgbench -N -c 1 -j 1 -T 10 "$server/bench_pgbench" 2>/dev/null | awk '/^tps/ {print $3; exit}')
pg16=$(pgbench -N -c 16 -j 2 -T 10 "$server/bench_pgbench" 2>/dev/null | awk '/^tps/ {print $3; exit}')
psql "$server/postgres" -qc "DROP DATABASE bench_pgbench"
echo "{\"pgbench_N\":{\"c1_tps\":$pg1,\"c16_tps\":$pg16}}" | tee -a "$out_json"
fi

{
  echo "Measured $(date -u +%Y-%m-%d) on commit $(git rev-parse --short HEAD): $(nproc) cores,"
  echo "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),"
  echo "$(psql "$server/postgres" -Atc 'SHOW server_version') (synchronous_commit $(psql "$server/postgres" -Atc 'SHOW synchronous_commit'))."
  echo
  python3 - "$out_json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| run | sagas/s | completed | failed | rejected | p50 ms | p90 ms | p99 ms | max ms | PlaceOrder p50 / p99 ms | CPU stolen s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "bench" not in r: continue
    b = r["bench"]
    name = f"closed C={b['concurrency']}" if b["mode"] == "closed" else f"open {b['rate']:.0f}/s for {b['duration_seconds']:.0f}s"
    l, p = r["latency_ms"], r["place_order_ms"]
    print(f"| {name} | {r['sagas_per_second']} | {r['completed']} | {r['failed']} | {r['rejected']} | {l['p50']} | {l['p90']} | {l['p99']} | {l['max']} | {p['p50']} / {p['p99']} | {r.get('steal_seconds', '')} |")
for r in rows:
    if "pgbench_N" in r:
        print(f"\npgbench -N: {r['pgbench_N']['c1_tps']:.0f} tps at 1 client, {r['pgbench_N']['c16_tps']:.0f} tps at 16 clients.")
    if "rss" in r:
        x = r["rss"]
        print(f"\nOrchestrator RSS: {x['rss_kib_idle']/1024:.0f} MiB idle, {x['rss_kib_peak']/1024:.0f} MiB peak with up to {x['in_flight']} sagas in flight.")
PY
} | tee "$out_md"
