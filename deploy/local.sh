#!/usr/bin/env bash
# Starts the whole system on this machine, on the local PostgreSQL: one
# database per service (created if missing), the three participants (with
# fault injection, so you can make steps fail) and the orchestrator, logs to
# the terminal. Ctrl-C (or SIGTERM) stops everything cleanly.
#
#   bash deploy/local.sh            # release build
#   bash deploy/local.sh --debug    # debug build (faster to compile)
#
# Environment (defaults in brackets):
#   DATABASE_SERVER   [postgres://postgres@127.0.0.1:5432]
#   DB_PREFIX         prefix of the database names [none: inventory, payment, ...]
#   ORCHESTRATOR_PORT [50051]  INVENTORY_PORT [50061]  PAYMENT_PORT [50062]
#   FULFILLMENT_PORT  [50063]
#   ORCHESTRATOR_HTTP_PORT, INVENTORY_HTTP_PORT, PAYMENT_HTTP_PORT,
#   FULFILLMENT_HTTP_PORT  the --http-listen port of each (/healthz, /readyz,
#                     /metrics) [none: off]; deploy/prometheus.yml scrapes
#                     9000, 9061, 9062 and 9063
set -euo pipefail
cd "$(dirname "$0")/.."

server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
prefix=${DB_PREFIX:-}
orchestrator_port=${ORCHESTRATOR_PORT:-50051}
inventory_port=${INVENTORY_PORT:-50061}
payment_port=${PAYMENT_PORT:-50062}
fulfillment_port=${FULFILLMENT_PORT:-50063}

if [ "${1:-}" = "--debug" ]; then
  cargo build --quiet --bins
  bin=target/debug
else
  cargo build --quiet --release --bins
  bin=target/release
fi

for service in inventory payment fulfillment orchestrator; do
  db="${prefix}${service}"
  exists=$(psql "$server/postgres" -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'")
  [ "$exists" = 1 ] || psql "$server/postgres" -qc "CREATE DATABASE \"$db\""
done

# --http-listen for a service whose *_HTTP_PORT is set.
http_flag() {
  local var="${1}_HTTP_PORT"
  if [ -n "${!var:-}" ]; then echo "--http-listen=127.0.0.1:${!var}"; fi
}

pids=()
stop() {
  trap - INT TERM EXIT
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

for participant in inventory payment fulfillment; do
  port_var="${participant}_port"
  "$bin/participant" "$participant" --listen "127.0.0.1:${!port_var}" \
    --database-url "$server/${prefix}${participant}" --fault-injection \
    $(http_flag "${participant^^}") &
  pids+=($!)
done
"$bin/orchestrator" serve --listen "127.0.0.1:$orchestrator_port" \
  --database-url "$server/${prefix}orchestrator" \
  --inventory-url "http://127.0.0.1:$inventory_port" \
  --payment-url "http://127.0.0.1:$payment_port" \
  --fulfillment-url "http://127.0.0.1:$fulfillment_port" $(http_flag ORCHESTRATOR) &
pids+=($!)

# Runs until stopped, or until one service dies (then stops the others).
wait -n
echo "local.sh: a service exited; stopping the others" >&2
exit 1
