#!/usr/bin/env bash
# Starts the whole system on this machine, on the local PostgreSQL:
# one database per service (created if missing), every service on its
# default port, logs to the terminal. Ctrl-C stops everything.
#   DATABASE_SERVER=postgres://postgres@127.0.0.1:5432 bash deploy/local.sh [--fault-injection]
set -euo pipefail
cd "$(dirname "$0")/.."

server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
extra=("$@")

cargo build --release --bins
for db in inventory payment fulfillment; do
  exists=$(psql "$server/postgres" -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'")
  [ "$exists" = 1 ] || psql "$server/postgres" -qc "CREATE DATABASE $db"
done

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
./target/release/participant inventory --listen 127.0.0.1:50061 --database-url "$server/inventory" "${extra[@]}" &
pids+=($!)
./target/release/participant payment --listen 127.0.0.1:50062 --database-url "$server/payment" "${extra[@]}" &
pids+=($!)
./target/release/participant fulfillment --listen 127.0.0.1:50063 --database-url "$server/fulfillment" "${extra[@]}" &
pids+=($!)
wait -n
