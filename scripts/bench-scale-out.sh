#!/usr/bin/env bash
# Scale-out benchmark: a mixed load of backup commands over four targets (PostgreSQL, Redis,
# RabbitMQ definitions, documents; Consul cannot run here), published at once to 1, 2 and 4
# worker processes (each running BENCH_CONCURRENCY steps at once, 1 by default) with the
# shipped retry schedule. Prints one row per worker count: throughput and its ratio to one
# worker, publish → started p50/p99, the most steps ever running at once for one target
# (must be 1), retry-queue publishes per command, and the busiest target: the seconds during
# which one of its steps ran. Steps of one target run one at a time, so the busiest target's
# seconds in the one-worker run bound every run: the last line prints that ceiling
# (one worker's seconds / the busiest target's seconds), whatever the number of workers.
#
#   scripts/bench-scale-out.sh                 # 200 commands
#   BENCH_COMMANDS=40 BENCH_WORKERS="1 2" scripts/bench-scale-out.sh
#   BENCH_BINARY=/path/to/crm-backup scripts/bench-scale-out.sh   # another build of the worker
#   BENCH_TARGETS=rabbitmq,documents scripts/bench-scale-out.sh   # another mix
#
# Redis's repl-diskless-sync-delay (5 s by default: every SYNC waits that long for other
# replicas) is set to 0 for the run and put back afterwards; otherwise the Redis steps,
# one at a time, would be most of the run whatever the number of workers.
#
# Needs PostgreSQL, Redis and RabbitMQ with the management plugin (scripts/test.sh sets them up).
set -euo pipefail
cd "$(dirname "$0")/.."

COMMANDS=${BENCH_COMMANDS:-200}
WORKER_COUNTS=${BENCH_WORKERS:-1 2 4}
TARGETS=${BENCH_TARGETS:-postgres,redis,rabbitmq,documents}
CONCURRENCY=${BENCH_CONCURRENCY:-1}
BINARY=${BENCH_BINARY:-./target/release/crm-backup}
MGMT=${TEST_RABBITMQ_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}
AMQP=${TEST_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672}
PG=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
VHOST=bench-scale-out-$$
DB=bench_scale_out_$$
WORK=$(mktemp -d)
PIDS=()
. scripts/bench-common.sh

cleanup() {
  stop_workers
  for workers in $WORKER_COUNTS; do
    curl -s -X DELETE "$MGMT/api/vhosts/$VHOST-$workers" >/dev/null || true
  done
  psql -X -q -d "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  [ -z "${REDIS_DELAY:-}" ] || redis-cli CONFIG SET repl-diskless-sync-delay "$REDIS_DELAY" >/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --locked -q --example bench_scale_out
[ -n "${BENCH_BINARY:-}" ] || cargo build --release --locked -q --bin crm-backup
psql -X -q -d "$PG/postgres" -c "CREATE DATABASE $DB"
psql -X -q -d "$PG/$DB" -c "CREATE TABLE deals AS SELECT i, md5(i::text) AS v FROM generate_series(1, 100000) i"
REDIS_DELAY=$(redis-cli CONFIG GET repl-diskless-sync-delay | sed -n 2p)
redis-cli CONFIG SET repl-diskless-sync-delay 0 >/dev/null
mkdir -p "$WORK/documents"
for i in $(seq 1 100); do head -c 20000 /dev/urandom > "$WORK/documents/file-$i.bin"; done

printf '| workers | seconds | commands/s | vs 1 worker | publish → started p50 (s) | p99 (s) | most steps at once per target | retry-queue publishes per command | busiest target: busy s | failed |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
base=""
ceiling=""
for workers in $WORKER_COUNTS; do
  vhost="$VHOST-$workers"
  make_vhost "$vhost"
  export RABBITMQ_URL="$AMQP/$vhost" DATABASE_URL="$PG/$DB" BACKUP_STORAGE_DIR="$WORK/backups-$workers" \
    BACKUP_CONFIG_DIR=/nonexistent RUST_LOG=warn BACKUP__HTTP__LISTEN= \
    BACKUP__RABBITMQ__CONCURRENCY="$CONCURRENCY" \
    BACKUP__AUTHORIZATION__GRANTS='guest=backup' \
    BACKUP__DOCUMENTS__ENABLED=true DOCUMENTS_STORAGE_ROOT="$WORK/documents"
  start_workers "$BINARY" "$workers"
  line=$(./target/release/examples/bench_scale_out "$RABBITMQ_URL" "$COMMANDS" "$TARGETS")
  get() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  stop_workers
  # The management API's counters lag by a few seconds.
  sleep 6
  retries=$(curl -s -f "$MGMT/api/queues/$vhost" |
    jq '[.[] | select(.name | startswith("backup.retry.")) | .message_stats.publish // 0] | add // 0')
  rate=$(get commands_per_s)
  [ -n "$base" ] || base=$rate
  [ -n "$ceiling" ] || ceiling=$(awk -v a="$(get seconds)" -v b="$(get busiest_busy_s)" 'BEGIN { printf "%.2f", a / b }')
  printf '| %s | %s | %s | %sx | %s | %s | %s | %s | %s %s | %s |\n' "$workers" "$(get seconds)" "$rate" \
    "$(awk -v a="$rate" -v b="$base" 'BEGIN { printf "%.2f", a / b }')" "$(get started_p50_s)" "$(get started_p99_s)" \
    "$(get most_at_once_per_target)" "$(awk -v a="$retries" -v b="$COMMANDS" 'BEGIN { printf "%.2f", a / b }')" \
    "$(get busiest_target)" "$(get busiest_busy_s)" "$(get failed)"
done
echo
echo "ceiling with one step per target at a time: ${ceiling}x the first row's throughput (its seconds / its busiest target's seconds)"
