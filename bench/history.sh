#!/usr/bin/env bash
# What costs grow with history: the system of deploy/local.sh (release
# binaries, local PostgreSQL, fresh databases) measured with 0 finished
# sagas, then again after finished sagas were added with SQL, up to each
# size given (default: 0 and 1,000,000; 10,000,000 takes about 25 GB and
# most of an hour to generate here):
#
#   bash bench/history.sh                   # sizes 0 1000000
#   bash bench/history.sh 0 1000000 10000000
#
# The generated history: sagas that finished one to three days ago (90%
# COMPLETED, 7% FAILED, 3% CANCELLED), 10,000 customers, 1,000 products,
# three journal rows each, ids older than every real one; then VACUUM
# ANALYZE. At each size it times, median of 11 calls, in milliseconds:
# sagactl stats, a /metrics scrape, sagactl stuck, the first page of
# ListSagas (sagactl list) and ListOrders (grpcurl, whose own start-up is
# most of its 100 ms) under each filter; then a closed loop at C=64
# (8,000 orders) and C=1 (500), and the sweeper's claim query
# (saga_sweep_duration_seconds over the C=64 run). One JSON line per size
# goes to bench/runs/history-<date>.jsonl, and a table is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(0 1000000)

server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
out=bench/runs/history-$(date -u +%Y%m%d-%H%M%S).jsonl
mkdir -p bench/runs
export RUST_LOG=warn DB_PREFIX=hist_
export ORCHESTRATOR_PORT=50251 INVENTORY_PORT=50261 PAYMENT_PORT=50262 FULFILLMENT_PORT=50263
export ORCHESTRATOR_HTTP_PORT=50259
O=127.0.0.1:$ORCHESTRATOR_PORT
db="$server/${DB_PREFIX}orchestrator"
sagactl=target/release/sagactl
cargo build --release --quiet --bins

fresh_databases() {
  for s in inventory payment fulfillment orchestrator; do
    psql "$server/postgres" -qc "DROP DATABASE IF EXISTS ${DB_PREFIX}$s WITH (FORCE)"
  done
}
system=""
start_system() {
  bash deploy/local.sh >/tmp/history-system.log 2>&1 &
  system=$!
  for _ in $(seq 1 600); do
    grpcurl -plaintext -d '{"service":"saga.v1.OrderService"}' "$O" \
      grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING && return 0
    sleep 0.2
  done
  echo "the system did not start"; tail -20 /tmp/history-system.log; exit 1
}
stop_system() { kill -TERM "$system" 2>/dev/null || true; wait "$system" 2>/dev/null || true; }
trap 'stop_system; fresh_databases' EXIT

# Adds finished sagas numbered FROM..TO-1, a million per statement.
generate() {
  local from=$1 to=$2 start end
  for ((start = from; start < to; start += 1000000)); do
    end=$((start + 1000000 < to ? start + 1000000 : to))
    psql "$db" -q -v ON_ERROR_STOP=1 -v from="$start" -v to="$((end - 1))" <<'SQL'
INSERT INTO sagas (saga_id, customer_id, items, status, state, version, total_amount_cents,
                   attempts, created_at, updated_at, progress_at, finished_at,
                   definition_name, definition_version)
SELECT 'ord_00' || lpad(to_hex(i), 30, '0'),
       'hist-' || (i % 10000),
       jsonb_build_array(jsonb_build_object('product_id', 'hist-p' || (i % 1000), 'quantity', 1 + i % 3)),
       s.status,
       jsonb_build_object(
         'phase', s.phase,
         'steps', jsonb_build_array(
           jsonb_build_object('attempted', true, 'action_attempts', 1, 'succeeded', true,
                              'compensation_attempts', s.undone, 'compensated', s.undone = 1, 'forgiven', 0),
           jsonb_build_object('attempted', s.status = 'COMPLETED', 'action_attempts', 1,
                              'succeeded', s.status = 'COMPLETED', 'compensation_attempts', 0,
                              'compensated', false, 'forgiven', 0),
           jsonb_build_object('attempted', s.status = 'COMPLETED', 'action_attempts', 1,
                              'succeeded', s.status = 'COMPLETED', 'compensation_attempts', 0,
                              'compensated', false, 'forgiven', 0)),
         'cause', s.cause, 'stop_requested', null, 'waiting_retry', false,
         'failure_reason', s.reason, 'last_error', null,
         'outputs', jsonb_build_object('reservation_id', 'res_' || i, 'total_amount_cents', '1000')),
       5, 1000, 1, t, t, t, t + interval '1 second', 'order', 1
FROM generate_series(:from::bigint, :to::bigint) AS i
CROSS JOIN LATERAL (SELECT now() - interval '3 days' + i * interval '15 ms' AS t) AS at
CROSS JOIN LATERAL (
  SELECT CASE WHEN i % 100 < 90 THEN 'COMPLETED' WHEN i % 100 < 97 THEN 'FAILED' ELSE 'CANCELLED' END AS status,
         CASE WHEN i % 100 < 90 THEN 'Completed' WHEN i % 100 < 97 THEN 'Failed' ELSE 'Cancelled' END AS phase,
         CASE WHEN i % 100 < 90 THEN 0 ELSE 1 END AS undone,
         CASE WHEN i % 100 < 90 THEN null WHEN i % 100 < 97 THEN 'Failure' ELSE 'Cancel' END AS cause,
         CASE WHEN i % 100 < 90 THEN null WHEN i % 100 < 97 THEN 'charge_payment rejected: insufficient funds'
              ELSE 'cancelled by the client' END AS reason) AS s;
INSERT INTO saga_journal (saga_id, step, kind, attempt, outcome, detail, rpc, actor, started_at, finished_at)
SELECT 'ord_00' || lpad(to_hex(i), 30, '0'), j.step, 'ACTION', 1, 'SUCCEEDED', '', j.rpc, 'history',
       now() - interval '3 days' + i * interval '15 ms', now() - interval '3 days' + i * interval '15 ms'
FROM generate_series(:from::bigint, :to::bigint) AS i
CROSS JOIN (VALUES ('reserve_inventory', 'inventory.v1.InventoryService/Reserve'),
                   ('charge_payment', 'payment.v1.PaymentService/Charge'),
                   ('ship_order', 'fulfillment.v1.FulfillmentService/Ship')) AS j(step, rpc);
SQL
    # The index of orders by product, on the commits that have it.
    if [ "$(psql "$db" -tAc "SELECT to_regclass('saga_products') IS NOT NULL")" = t ]; then
      psql "$db" -q -v ON_ERROR_STOP=1 -v from="$start" -v to="$((end - 1))" <<'SQL'
INSERT INTO saga_products (product_id, saga_id)
SELECT 'hist-p' || (i % 1000), 'ord_00' || lpad(to_hex(i), 30, '0')
FROM generate_series(:from::bigint, :to::bigint) AS i;
SQL
    fi
    echo "   $end finished sagas"
  done
  psql "$db" -qc "VACUUM ANALYZE sagas" -c "VACUUM ANALYZE saga_journal"
  if [ "$(psql "$db" -tAc "SELECT to_regclass('saga_products') IS NOT NULL")" = t ]; then
    psql "$db" -qc "VACUUM ANALYZE saga_products"
  fi
}

# Median wall time of 11 runs of a command, in ms.
median_ms() {
  python3 - "$@" <<'PY'
import subprocess, sys, time
times = []
for _ in range(11):
    start = time.perf_counter()
    subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times.append((time.perf_counter() - start) * 1000)
print(round(sorted(times)[5], 1))
PY
}
list_orders() { median_ms grpcurl -plaintext -d "$1" "$O" saga.v1.OrderService/ListOrders; }
sweep() {
  curl -s "http://127.0.0.1:$ORCHESTRATOR_HTTP_PORT/metrics" |
    awk '/^saga_sweep_duration_seconds_(sum|count) / {printf "%s ", $2}'
}

fresh_databases
start_system
# The demo customer and product the bench seeds are its own; seed the
# history's only in the orchestrator's database (the participants never see
# finished sagas).
have=0
for size in "${sizes[@]}"; do
  if [ "$size" -gt "$have" ]; then
    echo "== adding $((size - have)) finished sagas"
    generate "$have" "$size"
    have=$size
  fi
  echo "== $size finished sagas"
  stats=$(median_ms "$sagactl" --endpoint "http://$O" stats)
  metrics=$(median_ms curl -s "http://127.0.0.1:$ORCHESTRATOR_HTTP_PORT/metrics")
  stuck=$(median_ms "$sagactl" --endpoint "http://$O" stuck)
  list_any=$(median_ms "$sagactl" --endpoint "http://$O" list)
  list_failed=$(median_ms "$sagactl" --endpoint "http://$O" list --status FAILED)
  list_attention=$(median_ms "$sagactl" --endpoint "http://$O" list --status NEEDS_ATTENTION)
  list_customer=$(median_ms "$sagactl" --endpoint "http://$O" list --customer hist-42)
  list_product=$(median_ms "$sagactl" --endpoint "http://$O" list --product hist-p7)
  orders_any=$(list_orders '{}')
  orders_cancelled=$(list_orders '{"status":"ORDER_STATUS_CANCELLED"}')
  orders_customer=$(list_orders '{"customer_id":"hist-42"}')
  orders_product=$(list_orders '{"product_id":"hist-p7"}')
  read -r sum0 count0 <<<"$(sweep)"
  c64=$("$sagactl" --endpoint "http://$O" bench --inventory-url "http://127.0.0.1:$INVENTORY_PORT" \
    --payment-url "http://127.0.0.1:$PAYMENT_PORT" --quiet --output json --concurrency 64 --orders 8000 | tail -1)
  read -r sum1 count1 <<<"$(sweep)"
  c1=$("$sagactl" --endpoint "http://$O" bench --inventory-url "http://127.0.0.1:$INVENTORY_PORT" \
    --payment-url "http://127.0.0.1:$PAYMENT_PORT" --quiet --output json --concurrency 1 --orders 500 | tail -1)
  python3 - "$size" "$c64" "$c1" "${sum0:-0}" "${count0:-0}" "${sum1:-0}" "${count1:-0}" \
    "$stats" "$metrics" "$stuck" "$list_any" "$list_failed" "$list_attention" "$list_customer" "$list_product" \
    "$orders_any" "$orders_cancelled" "$orders_customer" "$orders_product" >>"$out" <<'PY'
import json, sys
a = sys.argv[1:]
c64, c1 = json.loads(a[1]), json.loads(a[2])
s0, n0, s1, n1 = map(float, a[3:7])
names = ["stats", "metrics", "stuck", "list", "list_failed", "list_needs_attention",
         "list_customer", "list_product", "orders", "orders_cancelled", "orders_customer", "orders_product"]
print(json.dumps({
    "finished_sagas": int(a[0]),
    "c64_sagas_per_second": c64["sagas_per_second"],
    "c1_p50_ms": c1["latency_ms"]["p50"] if "latency_ms" in c1 else c1.get("p50_ms"),
    "sweep_ms": round((s1 - s0) / (n1 - n0) * 1000, 2) if n1 > n0 else None,
    "ms": dict(zip(names, map(float, a[7:]))),
}))
PY
  tail -1 "$out"
done
stop_system

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
names = list(rows[0]["ms"])
print("| finished sagas | C=64 sagas/s | C=1 p50 ms | sweep claim ms | " + " | ".join(names) + " |")
print("|---" * (4 + len(names)) + "|")
for r in rows:
    print(f"| {r['finished_sagas']:,} | {r['c64_sagas_per_second']:.0f} | {r['c1_p50_ms']} | {r['sweep_ms']} | "
          + " | ".join(str(r["ms"][n]) for n in names) + " |")
PY
echo "written to $out"
