#!/usr/bin/env bash
# Before/after on a noisy host: builds each revision's release binaries,
# then alternates them, round after round, on fresh databases: a closed
# loop at C=64 (8,000 orders) and at C=1 (1,000 orders) per revision per
# round. Alternating spreads the host's drift (CPU stolen by neighbours
# varies from minute to minute here) over every revision alike; compare
# the medians, not single runs.
#
#   bash bench/ab.sh REV_BEFORE REV_AFTER [MORE_REVS...]
#   ROUNDS=6 bash bench/ab.sh main~3 main
#   RUNS="1 1000" bash bench/ab.sh main~3 main     # only C=1 (CONCURRENCY ORDERS, comma-separated)
#
# A revision written REV:RATIO runs with traces exported: every service
# gets --otlp-endpoint (an otlp-sink from this tree, which counts and drops
# what it receives) and OTEL_TRACES_SAMPLER=parentbased_traceidratio with
# RATIO as its argument. The tracing cost of one revision:
#
#   bash bench/ab.sh main main:0.01 main:1
#
# A revision written REV:tls runs with mTLS on every hop: each server gets
# --tls-cert/--tls-key/--tls-client-ca, the orchestrator calls https://
# participants with a client certificate, and sagactl does the same
# (certificates made once with openssl, kept in target/ab/tls). The TLS
# cost of one revision:
#
#   bash bench/ab.sh main main:tls
#
# Writes bench/runs/ab-<date>.jsonl (one line per run) and prints the
# medians per revision. Binaries are kept in target/ab/<commit>, the
# servers' warnings in target/ab/servers.log.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash bench/ab.sh REV_BEFORE REV_AFTER [MORE_REVS...]"; exit 2; }

server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
rounds=${ROUNDS:-4}
root=$(pwd)
out=bench/runs/ab-$(date -u +%Y%m%d-%H%M%S).jsonl
# The servers' warnings and errors, every run's (RUST_LOG=warn).
log=target/ab/servers.log
mkdir -p bench/runs target/ab
export RUST_LOG=warn

commits=()
variants=()
traced=0
for arg in "$@"; do
  rev=${arg%%:*}
  ratio=
  [ "$rev" != "$arg" ] && ratio=${arg#*:}
  [ -n "$ratio" ] && [ "$ratio" != tls ] && traced=1
  commit=$(git rev-parse --short "$rev")
  commits+=("$commit")
  variants+=("$commit${ratio:+:$ratio}")
  bins=target/ab/$commit
  [ -x "$bins/orchestrator" ] && continue
  echo "== building $commit"
  tree=$(mktemp -d)
  git worktree add --detach "$tree" "$commit" >/dev/null
  # One target directory for every revision: dependencies build once.
  (cd "$tree" && CARGO_TARGET_DIR="$root/target/ab/build" cargo build --release --quiet --bins)
  git worktree remove --force "$tree"
  mkdir -p "$bins"
  cp target/ab/build/release/{orchestrator,participant,sagactl} "$bins/"
done

if [ "$traced" = 1 ] && [ ! -x target/ab/otlp-sink ]; then
  echo "== building otlp-sink (kept in target/ab/otlp-sink)"
  cargo build --release --quiet -p saga-tests --bin otlp-sink
  cp target/release/otlp-sink target/ab/otlp-sink
fi

if printf '%s\n' "$@" | grep -q ':tls$' && [ ! -f target/ab/tls/client.key ]; then
  echo "== making a CA, a server and a client certificate (kept in target/ab/tls)"
  mkdir -p target/ab/tls
  (cd target/ab/tls
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj /CN=ab-ca -keyout ca.key -out ca.pem 2>/dev/null
    for who in server client; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=ab-$who" \
        -keyout $who.key -out $who.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >$who.ext
      openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile $who.ext -out $who.pem 2>/dev/null
    done)
fi

pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap stop EXIT
fresh() {
  for s in inventory payment fulfillment orchestrator; do
    psql "$server/postgres" -qc "DROP DATABASE IF EXISTS ab_$s WITH (FORCE)" -qc "CREATE DATABASE ab_$s" 2>/dev/null
  done
}
steal() { awk '/^cpu / {print $9}' /proc/stat; }

for round in $(seq 1 "$rounds"); do
  for variant in "${variants[@]}"; do
    commit=${variant%%:*}
    ratio=${variant#"$commit"}
    ratio=${ratio#:}
    bins=target/ab/$commit
    fresh
    unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG
    scheme=http server_tls=() client_tls=() sagactl_tls=() grpcurl_tls=(-plaintext)
    if [ "$ratio" = tls ]; then
      t=target/ab/tls
      scheme=https
      server_tls=(--tls-cert $t/server.pem --tls-key $t/server.key --tls-client-ca $t/ca.pem)
      client_tls=(--participant-ca $t/ca.pem --client-cert $t/client.pem --client-key $t/client.key)
      sagactl_tls=(--ca-cert $t/ca.pem --cert $t/client.pem --key $t/client.key)
      grpcurl_tls=(-cacert $t/ca.pem -cert $t/client.pem -key $t/client.key)
    elif [ -n "$ratio" ]; then
      target/ab/otlp-sink --listen 127.0.0.1:50299 >>"$out.sink" 2>/dev/null &
      pids+=($!)
      export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:50299
      export OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$ratio
    fi
    for p in inventory:50261 payment:50262 fulfillment:50263; do
      "$bins/participant" "${p%%:*}" --listen "127.0.0.1:${p##*:}" \
        --database-url "$server/ab_${p%%:*}" "${server_tls[@]}" >/dev/null 2>>"$log" &
      pids+=($!)
    done
    "$bins/orchestrator" serve --listen 127.0.0.1:50251 --database-url "$server/ab_orchestrator" \
      --inventory-url $scheme://127.0.0.1:50261 --payment-url $scheme://127.0.0.1:50262 \
      --fulfillment-url $scheme://127.0.0.1:50263 "${server_tls[@]}" "${client_tls[@]}" >/dev/null 2>>"$log" &
    pids+=($!)
    # Every server answers its health check before the run starts; one
    # that does not within a minute stops the benchmark (its log says why).
    for port in 50261 50262 50263 50251; do
      for try in $(seq 1 300); do
        grpcurl "${grpcurl_tls[@]}" 127.0.0.1:$port grpc.health.v1.Health/Check 2>/dev/null \
          | grep -q SERVING && break
        [ "$try" = 300 ] && { echo "the server on port $port never became healthy; see $log" >&2; exit 1; }
        sleep 0.2
      done
    done
    IFS=, read -r -a runs <<<"${RUNS:-64 8000,1 1000}"
    for run in "${runs[@]}"; do
      set -- $run
      before=$(steal)
      line=$("$bins/sagactl" --endpoint $scheme://127.0.0.1:50251 "${sagactl_tls[@]}" bench \
        --inventory-url $scheme://127.0.0.1:50261 --payment-url $scheme://127.0.0.1:50262 \
        --quiet --output json --concurrency "$1" --orders "$2" | tail -1)
      python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print(json.dumps({"round": int(sys.argv[2]), "commit": sys.argv[3], "concurrency": int(sys.argv[4]),
                  "sagas_per_second": d["sagas_per_second"], "p50_ms": d["latency_ms"]["p50"],
                  "failed": d["failed"], "steal_seconds": (int(sys.argv[6]) - int(sys.argv[5])) / 100}))' \
        "$line" "$round" "$variant" "$1" "$before" "$(steal)" | tee -a "$out"
    done
    stop
  done
done

python3 - "$out" "${variants[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| commit[:sampling or tls] | C=64 sagas/s (median) | C=64 runs | C=1 p50 ms (median) | C=1 runs |")
print("|---|---|---|---|---|")
for commit in sys.argv[2:]:
    c64 = [r["sagas_per_second"] for r in rows if r["commit"] == commit and r["concurrency"] == 64]
    c1 = [r["p50_ms"] for r in rows if r["commit"] == commit and r["concurrency"] == 1]
    med = lambda xs, f: format(statistics.median(xs), f) if xs else "-"
    print(f"| {commit} | {med(c64, '.0f')} | {', '.join(f'{x:.0f}' for x in c64)} "
          f"| {med(c1, '.2f')} | {', '.join(f'{x:.1f}' for x in c1)} |")
PY
