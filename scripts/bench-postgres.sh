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
# peak RSS <= 64 MiB, and flat when the database is 4x larger. crm-backup signs its manifests
# (as production does); the same binary without a signing key runs too: signing's cost.
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
postgres_bench_setup
BASE=${BENCH_BASELINE_BIN:-}
# The baseline reads its own release's configuration (BENCH_BASELINE_CONFIG, default: the
# `config/` beside the binary's `target/`), which may lack this one's sections.
BASE_CONFIG=${BENCH_BASELINE_CONFIG:-$(dirname "$(dirname "$(dirname "${BASE:-/x/x/x}")")")/config}

use_garage
minisign -G -W -s "$WORK/worker.key" -p "$WORK/worker.pub" >/dev/null </dev/null

DB=$(pgbench_db "$SCALE")
SIZE=$(psql -X -At -d "$PG/postgres" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")
pg_dump -Fc -Z0 -d "$PG/$DB" > /dev/null   # warm the cache once

pg_run() { # <label>: one command of a round
  case $1 in
    pg_dump) measure pg_dump pg_dump -Fc -Z0 -d "$PG/$DB" ;;
    shell) measure shell sh -c "pg_dump -Fc -Z0 -d '$PG/$DB' | zstd -3 -T0 -q > '$WORK/dump.zst'" ;;
    crm) measure crm env DATABASE_URL="$PG/$DB" BACKUP_SIGNING_KEY_FILE="$WORK/worker.key" "$BIN" run postgres ;;
    crm_unsigned) measure crm_unsigned env DATABASE_URL="$PG/$DB" "$BIN" run postgres ;;
    crm_base) measure crm_base env BACKUP_CONFIG_DIR="$BASE_CONFIG" DATABASE_URL="$PG/$DB" "$BASE" run postgres ;;
  esac
  rm -f "$WORK/dump.zst"
}
PG_COMMANDS=(pg_dump shell crm crm_unsigned)
[ -n "$BASE" ] && PG_COMMANDS+=(crm_base)
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_rotated "$round" pg_run "${PG_COMMANDS[@]}"
done

printf '\nPostgreSQL backup, database %s (%s), median of %s rounds, storage: Garage on loopback\n\n' "$DB" "$SIZE" "$ROUNDS"
table_head pg_dump
row '`pg_dump -Fc -Z0 > /dev/null`' pg_dump pg_dump
row '`pg_dump -Fc -Z0 | zstd -3 -T0 > file`' shell pg_dump
row '`crm-backup run postgres` (to Garage, manifest signed)' crm pg_dump
row '`crm-backup run postgres` (to Garage, no signing key)' crm_unsigned pg_dump
[ -n "$BASE" ] && row "baseline \`$BASE run postgres\` (to Garage)" crm_base pg_dump
printf '\nsigning: signed vs unsigned %sx\n' "$(div "$(col crm 1)" "$(col crm_unsigned 1)")"
printf '\nseconds of each round:\n'
rounds pg_dump shell crm crm_unsigned crm_base

if [ "$LARGE_SCALE" != 0 ]; then
  LARGE=$(pgbench_db "$LARGE_SCALE")
  LARGE_SIZE=$(psql -X -At -d "$PG/postgres" -c "SELECT pg_size_pretty(pg_database_size('$LARGE'))")
  measure crm_large env DATABASE_URL="$PG/$LARGE" "$BIN" run postgres
  small=$(col crm 2); large=$(col crm_large 2)
  printf '\n| database | crm-backup seconds | peak RSS (MiB) |\n|---|---|---|\n'
  printf '| %s (%s) | %s | %s |\n' "$DB" "$SIZE" "$(col crm 1)" "$(div "$small" 1024)"
  printf '| %s (%s) | %s | %s |\n' "$LARGE" "$LARGE_SIZE" "$(col crm_large 1)" "$(div "$large" 1024)"
  printf '\npeak RSS ratio, scale %s vs scale %s: %s\n' "$LARGE_SCALE" "$SCALE" "$(div "$large" "$small")"
fi
