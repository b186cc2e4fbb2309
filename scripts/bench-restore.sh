#!/usr/bin/env bash
# PostgreSQL restore benchmark: `crm-backup restore` from Garage, with its artifact verified
# before use (restore.verify_first, the default) and streamed (off), against the stock
# pipeline from a local file, `zstd -dc file | pg_restore -d NEW`, in one run.
#
#   scripts/bench-restore.sh                    # scale 50 (~750 MB), 3 rounds
#   BENCH_SCALE=20 BENCH_ROUNDS=5 scripts/bench-restore.sh
#
# Each command restores into a new database, dropped (untimed) after it. Prints medians of
# wall time, peak RSS and the machine's CPU time (scripts/bench-common.sh) and the target's
# ratio: verified restore <= 1.10x the stock pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

SCALE=${BENCH_SCALE:-50}
ROUNDS=${BENCH_ROUNDS:-3}
PG=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

. scripts/bench-common.sh
postgres_bench_setup
DB=$(pgbench_db "$SCALE")
SIZE=$(psql -X -At -d "$PG/postgres" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")

# Signed backups in the Garage bucket, as production has them.
minisign -G -W -s "$WORK/worker.key" -p "$WORK/worker.pub" >/dev/null </dev/null
use_garage
export BACKUP_SIGNING_KEY_FILE="$WORK/worker.key" BACKUP__SIGNING__ALLOW_UNSIGNED=false DATABASE_URL="$PG/$DB"
"$BIN" run postgres >&2
ID=$("$BIN" list postgres --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["backup_id"])')
pg_dump -Fc -Z0 -d "$PG/$DB" | zstd -3 -T0 -q > "$WORK/dump.zst"

INTO=crm_bench_restore
drop() { psql -X -q -d "$PG/postgres" -c "DROP DATABASE IF EXISTS $INTO" 2>/dev/null; }
restore_run() { # <label>: one command of a round
  drop
  case $1 in
    stock) measure stock sh -c "createdb -h 127.0.0.1 -U postgres $INTO && zstd -dc '$WORK/dump.zst' | pg_restore --exit-on-error --single-transaction -d '$PG/$INTO'" ;;
    verified) measure verified "$BIN" restore postgres --backup "$ID" --into "$INTO" ;;
    streamed) measure streamed env BACKUP__RESTORE__VERIFY_FIRST=false "$BIN" restore postgres --backup "$ID" --into "$INTO" ;;
  esac
  drop
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_rotated "$round" restore_run stock verified streamed
done

printf '\nPostgreSQL restore, database %s (%s), median of %s rounds, backup in Garage on loopback\n\n' "$DB" "$SIZE" "$ROUNDS"
table_head stock
row '`createdb NEW && zstd -dc file | pg_restore -d NEW` (local file)' stock stock
row '`crm-backup restore postgres --into NEW` (verified first, from Garage)' verified stock
row '`crm-backup restore postgres --into NEW` (streamed: `verify_first = false`)' streamed stock
printf '\nseconds of each round:\n'
rounds stock verified streamed
