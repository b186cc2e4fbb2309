#!/usr/bin/env bash
# Messaging benchmark: publish → backup.started latency (p50/p99) and the throughput of a burst
# of small commands (backups of an empty database), with 1 and with 2 worker processes.
#
#   scripts/bench-messaging.sh            # 200 latency samples, bursts of 1000 commands
#   BENCH_SAMPLES=50 BENCH_BURST=200 scripts/bench-messaging.sh
#
# Needs RabbitMQ with the management plugin and PostgreSQL (scripts/test.sh sets them up).
set -euo pipefail
cd "$(dirname "$0")/.."

SAMPLES=${BENCH_SAMPLES:-200}
BURST=${BENCH_BURST:-1000}
MGMT=${TEST_RABBITMQ_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}
AMQP=${TEST_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672}
PG=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
VHOST=bench-messaging-$$
DB=bench_messaging_$$
WORK=$(mktemp -d)
PIDS=()
. scripts/bench-common.sh

cleanup() {
  stop_workers
  for workers in 1 2; do
    curl -s -X DELETE "$MGMT/api/vhosts/$VHOST-$workers" >/dev/null || true
  done
  psql -X -q -d "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --locked -q --bin crm-backup --example bench_messaging
psql -X -q -d "$PG/postgres" -c "CREATE DATABASE $DB"
printf '| workers | publish → started p50 (ms) | p99 (ms) | burst of %s: seconds | commands/s |\n|---|---|---|---|---|\n' "$BURST"
for workers in 1 2; do
  vhost="$VHOST-$workers"
  make_vhost "$vhost"
  export RABBITMQ_URL="$AMQP/$vhost" DATABASE_URL="$PG/$DB" BACKUP_STORAGE_DIR="$WORK/backups-$workers" \
    BACKUP__MESSAGING__RETRY_DELAYS=500ms BACKUP_CONFIG_DIR=/nonexistent RUST_LOG=warn \
    BACKUP__HTTP__LISTEN=127.0.0.1:0 BACKUP__AUTHORIZATION__GRANTS='guest=backup'
  start_workers ./target/release/crm-backup "$workers"
  line=$(./target/release/examples/bench_messaging "$RABBITMQ_URL" "$SAMPLES" "$BURST")
  get() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  printf '| %s | %s | %s | %s | %s |\n' "$workers" "$(get latency_p50_ms)" "$(get latency_p99_ms)" "$(get burst_s)" "$(get commands_per_s)"
  stop_workers
  curl -s -X DELETE "$MGMT/api/vhosts/$vhost" >/dev/null
done
