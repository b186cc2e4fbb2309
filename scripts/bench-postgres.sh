#!/usr/bin/env bash
# PostgreSQL backup benchmark: crm-backup against pg_dump alone and a shell pipeline, in one run.
#
#   scripts/bench-postgres.sh            # scale 50 (~750 MB), 3 rounds, plus RSS at scale 200
#   BENCH_LARGE_SCALE=0 scripts/bench-postgres.sh   # skip the 4x database
#   BENCH_BASELINE_BIN=/path/to/old/crm-backup scripts/bench-postgres.sh
#       # also runs that binary in the same rotation: an A/B of two builds in one run
#
# Prints medians of wall time, peak RSS (/usr/bin/time) and the whole machine's CPU time (see
# scripts/bench-common.sh), and the ratios the targets use: crm-backup <= 1.05x pg_dump alone,
# peak RSS <= 64 MiB, and flat when the database is 4x larger.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

SCALE=${BENCH_SCALE:-50}
LARGE_SCALE=${BENCH_LARGE_SCALE:-200}
ROUNDS=${BENCH_ROUNDS:-3}
PG=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

. scripts/bench-common.sh
command -v pgbench >/dev/null || apt-get install -y -q postgresql-contrib >/dev/null
command -v zstd >/dev/null || apt-get install -y -q zstd >/dev/null
eval "$(./scripts/garage.sh)"
cargo build --release --locked -q
BIN=$PWD/target/release/crm-backup
BASE=${BENCH_BASELINE_BIN:-}

ensure_db() { # <scale>
  local db=crm_bench_$1
  if [ "$(psql -X -At -d "$PG/postgres" -c "SELECT count(*) FROM pg_database WHERE datname = '$db'")" = 0 ]; then
    echo "creating $db with pgbench -i -s $1 ..." >&2
    psql -X -q -d "$PG/postgres" -c "CREATE DATABASE $db"
    pgbench -i -q -s "$1" "$PG/$db" >&2
  fi
  echo "$db"
}

# crm-backup writes to the Garage bucket under bench/.
export BACKUP_S3_ENDPOINT="$BACKUP_TEST_S3_ENDPOINT" BACKUP_S3_BUCKET="$BACKUP_TEST_S3_BUCKET" \
  BACKUP_S3_REGION="$BACKUP_TEST_S3_REGION" BACKUP_S3_ACCESS_KEY="$BACKUP_TEST_S3_ACCESS_KEY" \
  BACKUP_S3_SECRET_KEY="$BACKUP_TEST_S3_SECRET_KEY" BACKUP_STORAGE_PREFIX="bench/$(date +%s)"

DB=$(ensure_db "$SCALE")
SIZE=$(psql -X -At -d "$PG/postgres" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
pg_dump -Fc -Z0 -d "$PG/$DB" > /dev/null   # warm the cache once

pg_run() { # <label>: one command of a round
  case $1 in
    pg_dump) measure pg_dump pg_dump -Fc -Z0 -d "$PG/$DB" ;;
    shell) measure shell sh -c "pg_dump -Fc -Z0 -d '$PG/$DB' | zstd -3 -T0 -q > '$WORK/dump.zst'" ;;
    crm) measure crm env DATABASE_URL="$PG/$DB" "$BIN" run postgres ;;
    crm_base) measure crm_base env DATABASE_URL="$PG/$DB" "$BASE" run postgres ;;
  esac
  rm -f "$WORK/dump.zst"
}
PG_COMMANDS=(pg_dump shell crm)
[ -n "$BASE" ] && PG_COMMANDS+=(crm_base)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_rotated "$round" pg_run "${PG_COMMANDS[@]}"
done

printf '\nPostgreSQL backup, database %s (%s), median of %s rounds, storage: Garage on loopback\n\n' "$DB" "$SIZE" "$ROUNDS"
table_head pg_dump
row '`pg_dump -Fc -Z0 > /dev/null`' pg_dump pg_dump
row '`pg_dump -Fc -Z0 | zstd -3 -T0 > file`' shell pg_dump
row '`crm-backup run postgres` (to Garage)' crm pg_dump
[ -n "$BASE" ] && row "baseline \`$BASE run postgres\` (to Garage)" crm_base pg_dump
printf '\nseconds of each round:\n'
rounds pg_dump shell crm crm_base

if [ "$LARGE_SCALE" != 0 ]; then
  LARGE=$(ensure_db "$LARGE_SCALE")
  LARGE_SIZE=$(psql -X -At -d "$PG/postgres" -c "SELECT pg_size_pretty(pg_database_size('$LARGE'))")
  measure crm_large env DATABASE_URL="$PG/$LARGE" "$BIN" run postgres
  small=$(col crm 2); large=$(col crm_large 2)
  printf '\n| database | crm-backup seconds | peak RSS (MiB) |\n|---|---|---|\n'
  printf '| %s (%s) | %s | %s |\n' "$DB" "$SIZE" "$(col crm 1)" "$(div "$small" 1024)"
  printf '| %s (%s) | %s | %s |\n' "$LARGE" "$LARGE_SIZE" "$(col crm_large 1)" "$(div "$large" 1024)"
  printf '\npeak RSS ratio, scale %s vs scale %s: %s\n' "$LARGE_SCALE" "$SCALE" "$(div "$large" "$small")"
fi
