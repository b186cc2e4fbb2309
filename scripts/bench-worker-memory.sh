#!/usr/bin/env bash
# A worker's memory across consecutive documents backups to Garage: each backup after the
# first runs beside earlier ones and reads their manifests, as in production. Samples the
# worker's RSS every 20 ms and prints, per backup, its peak and what the worker keeps once
# the backup is done (the lowest RSS in the 0.3 s after it), then the peak of the whole run.
# Target: peak RSS <= 64 MiB, and neither figure growing from backup to backup.
#
#   BENCH_BACKUPS=8 BENCH_DOCS_MB=2048 BENCH_DOCS_FILES=20000 scripts/bench-worker-memory.sh
#   BENCH_BASELINE_BIN=/path/to/other/crm-backup scripts/bench-worker-memory.sh
#       # runs that binary's worker the same way afterwards
# Needs the local RabbitMQ (RABBITMQ_URL, default guest on 127.0.0.1) with no other worker on
# its `backup.commands`, and the documents tree that scripts/bench-targets.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

BACKUPS=${BENCH_BACKUPS:-8}
DOCS_MB=${BENCH_DOCS_MB:-2048}
DOCS_FILES=${BENCH_DOCS_FILES:-20000}
DATA=${BENCH_DATA_DIR:-$HOME/.cache/crm-backup/bench}
DOCS="$DATA/documents-$DOCS_FILES-$DOCS_MB"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

eval "$(./scripts/garage.sh)"
cargo build --release --locked -q --bin crm-backup
[ -d "$DOCS" ] || { echo "no $DOCS: run BENCH_TARGETS=documents scripts/bench-targets.sh once" >&2; exit 1; }
export BACKUP_S3_ENDPOINT="$BACKUP_TEST_S3_ENDPOINT" BACKUP_S3_BUCKET="$BACKUP_TEST_S3_BUCKET" \
  BACKUP_S3_REGION="$BACKUP_TEST_S3_REGION" BACKUP_S3_ACCESS_KEY="$BACKUP_TEST_S3_ACCESS_KEY" \
  BACKUP_S3_SECRET_KEY="$BACKUP_TEST_S3_SECRET_KEY" BACKUP_CONFIG_DIR=/nonexistent \
  DOCUMENTS_STORAGE_ROOT="$DOCS" BACKUP__DOCUMENTS__ENABLED=true \
  BACKUP__HTTP__LISTEN=127.0.0.1:0 BACKUP__AUTHORIZATION__GRANTS=guest=backup

run_worker() { # <label> <binary>
  local label=$1 bin=$2 pid i
  export BACKUP_STORAGE_PREFIX="bench-worker/$label-$(date +%s)"
  "$bin" setup >/dev/null 2>&1
  "$bin" worker >"$WORK/$label.log" 2>&1 &
  pid=$!
  sleep 2
  while kill -0 "$pid" 2>/dev/null; do
    echo "$(date +%s.%N) $(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null)"
    sleep 0.02
  done >"$WORK/$label.rss" &
  for i in $(seq 1 "$BACKUPS"); do
    echo "$i $(date +%s.%N)" >>"$WORK/$label.marks"
    "$bin" enqueue backup documents --wait --timeout 10m >/dev/null 2>"$WORK/enqueue.err" ||
      { cat "$WORK/enqueue.err" >&2; exit 1; }
    echo "$i $(date +%s.%N)" >>"$WORK/$label.marks"
  done
  sleep 0.5
  kill -TERM "$pid"
  wait "$pid" || true
  python3 - "$label" "$WORK/$label.marks" "$WORK/$label.rss" <<'PY'
import sys
label, marks, rss = sys.argv[1:]
times = {}
for line in open(marks):
    i, t = line.split()
    times.setdefault(int(i), []).append(float(t))
samples = [(float(t), int(r)) for t, r in (l.split() for l in open(rss) if len(l.split()) == 2)]
rows = []
for i, (start, end) in sorted(times.items()):
    peak = max((r for t, r in samples if start <= t <= end), default=0)
    kept = min((r for t, r in samples if end < t <= end + 0.3), default=0)
    rows.append(f"| {label} | {i} | {end - start:.1f} | {peak / 1024:.1f} | {kept / 1024:.1f} |")
print("\n".join(rows))
print(f"| {label} | all | | **{max(r for _, r in samples) / 1024:.1f}** | |")
PY
}

echo "| worker | backup | seconds | peak RSS (MiB) | kept after it (MiB) |"
echo "|---|---|---|---|---|"
run_worker crm-backup "$PWD/target/release/crm-backup"
[ -n "${BENCH_BASELINE_BIN:-}" ] && run_worker baseline "$BENCH_BASELINE_BIN"
exit 0
