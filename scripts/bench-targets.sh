#!/usr/bin/env bash
# Redis and documents backup benchmarks, each against the reference tool, in one run:
#   Redis (~1 GiB, half-random values):  redis-cli --rdb <file>      vs  crm-backup run redis
#   documents (~2 GiB, 20,000 files):    tar -cf - | zstd -3 -T0 > f  vs  crm-backup run documents
#     (and against the same tar | zstd with its file fdatasynced at the end, as crm-backup's are)
#   (and `restic backup` when restic is installed)
# crm-backup writes once to the local storage directory (on the same disk as the reference
# tools' files: the like-for-like comparison) and once to Garage on loopback (which shares
# the CPU). Prints medians of wall time, peak RSS and the whole machine's CPU time (see
# scripts/bench-common.sh) and the ratios; targets: <= 1.10x the reference tool's time,
# peak RSS <= 64 MiB.
#
#   BENCH_ROUNDS=3 BENCH_REDIS_MB=1024 BENCH_DOCS_MB=2048 BENCH_DOCS_FILES=20000 scripts/bench-targets.sh
#   BENCH_TARGETS=documents scripts/bench-targets.sh     # only one of: redis documents
#   BENCH_BASELINE_BIN=/path/to/old/crm-backup scripts/bench-targets.sh
#       # also runs that binary (to the local directory) in the same rotation: an A/B in one run
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

ROUNDS=${BENCH_ROUNDS:-3}
TARGETS=" ${BENCH_TARGETS:-redis documents} "
REDIS_MB=${BENCH_REDIS_MB:-1024}
DOCS_MB=${BENCH_DOCS_MB:-2048}
DOCS_FILES=${BENCH_DOCS_FILES:-20000}
DATA=${BENCH_DATA_DIR:-$HOME/.cache/crm-backup/bench}
WORK=$(mktemp -d)
REDIS_PORT=${BENCH_REDIS_PORT:-6390}
cleanup() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

. scripts/bench-common.sh
eval "$(./scripts/garage.sh)"
cargo build --release --locked -q --bin crm-backup
BIN=$PWD/target/release/crm-backup
BASE=${BENCH_BASELINE_BIN:-}
# The baseline reads its own release's configuration (BENCH_BASELINE_CONFIG, default: the
# `config/` beside the binary's `target/`), which may lack this one's sections.
BASE_CONFIG=${BENCH_BASELINE_CONFIG:-$(dirname "$(dirname "$(dirname "${BASE:-/x/x/x}")")")/config}
export BACKUP_S3_ENDPOINT="$BACKUP_TEST_S3_ENDPOINT" BACKUP_S3_BUCKET="$BACKUP_TEST_S3_BUCKET" \
  BACKUP_S3_REGION="$BACKUP_TEST_S3_REGION" BACKUP_S3_ACCESS_KEY="$BACKUP_TEST_S3_ACCESS_KEY" \
  BACKUP_S3_SECRET_KEY="$BACKUP_TEST_S3_SECRET_KEY" BACKUP_STORAGE_PREFIX="bench/$(date +%s)" \
  BACKUP_CONFIG_DIR=/nonexistent

# The same run into the local storage directory instead of S3.
LOCAL=(-u BACKUP_S3_ENDPOINT -u BACKUP_S3_BUCKET -u BACKUP_S3_REGION -u BACKUP_S3_ACCESS_KEY
  -u BACKUP_S3_SECRET_KEY BACKUP_STORAGE_DIR="$WORK/local")

# --- Redis: a private server with ~REDIS_MB of data (values are hex of random bytes) ---
if [[ $TARGETS == *" redis "* ]]; then
mkdir -p "$DATA/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DATA/redis" \
  --dbfilename bench.rdb --daemonize yes >/dev/null
sleep 0.5
if [ ! -s "$DATA/redis/bench.rdb" ]; then
  echo "loading ~${REDIS_MB} MiB into Redis ..." >&2
  python3 - "$REDIS_MB" <<'PY' | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
import os, sys
mb = int(sys.argv[1]); n = mb * 1024 // 1
out = sys.stdout.buffer
for i in range(n):
    value = os.urandom(256).hex() + "crm:" * 128
    key = f"crm:fsm:{i}"
    out.write(f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${len(value)}\r\n{value}\r\n".encode())
PY
  redis-cli -p "$REDIS_PORT" save >/dev/null
else
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DATA/redis" \
    --dbfilename bench.rdb --daemonize yes >/dev/null
  until redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; do sleep 0.5; done
fi
REDIS_MEM=$(redis-cli -p "$REDIS_PORT" info memory | sed -n 's/^used_memory_human:\(.*\)\r$/\1/p')
redis_run() { # <label>: one Redis command; each leaves nothing behind for the next
  case $1 in
    # redis-cli needs a real file (it truncates and fsyncs it): the same disk Garage writes to.
    redis_cli) measure redis_cli redis-cli -p "$REDIS_PORT" --rdb "$WORK/dump.rdb" ;;
    redis_local) measure redis_local env "${LOCAL[@]}" REDIS_PORT="$REDIS_PORT" "$BIN" run redis ;;
    redis_crm) measure redis_crm env REDIS_PORT="$REDIS_PORT" "$BIN" run redis ;;
    redis_base) measure redis_base env "${LOCAL[@]}" BACKUP_CONFIG_DIR="$BASE_CONFIG" REDIS_PORT="$REDIS_PORT" "$BASE" run redis ;;
  esac
  rm -rf "$WORK/dump.rdb" "$WORK/local"
}
REDIS_COMMANDS=(redis_cli redis_local redis_crm)
[ -n "$BASE" ] && REDIS_COMMANDS+=(redis_base)
for round in $(seq 1 "$ROUNDS"); do
  echo "redis round $round/$ROUNDS" >&2
  run_rotated "$round" redis_run "${REDIS_COMMANDS[@]}"
done
fi

# --- documents: DOCS_FILES files, ~DOCS_MB in total (half random, half text) ---
if [[ $TARGETS == *" documents "* ]]; then
DOCS="$DATA/documents-$DOCS_FILES-$DOCS_MB"
if [ ! -d "$DOCS" ]; then
  echo "creating $DOCS_FILES files, ~${DOCS_MB} MiB ..." >&2
  python3 - "$DOCS" "$DOCS_FILES" "$DOCS_MB" <<'PY'
import os, sys
root, files, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = mb * 1024 * 1024 // files
for i in range(files):
    d = os.path.join(root, f"customer-{i % 500:03d}", f"{i % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"document-{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(size // 2) + (b"Invoice line %d\n" % i) * (size // 2 // 16))
PY
fi
DOCS_SIZE=$(du -sh "$DOCS" | cut -f1)
# Read the tree once so that no round reads it from disk (the Redis part above writes
# gigabytes, which can push it out of the page cache). Through a pipe: GNU tar skips file
# contents when it writes to /dev/null.
tar -cf - -C "$DOCS" . | cat > /dev/null
# One documents command by its label; each leaves nothing behind for the next.
docs_run() {
  case $1 in
    tar_zstd)
      measure tar_zstd sh -c "tar -cf - -C '$DOCS' . | zstd -3 -T0 -q > '$WORK/docs.tar.zst'" ;;
    tar_zstd_sync)
      # The same, with the file made durable at the end as crm-backup makes its artifacts
      # (fdatasync before the manifest is written): writing ~1 GB to this disk takes seconds.
      measure tar_zstd_sync sh -c "tar -cf - -C '$DOCS' . | zstd -3 -T0 -q > '$WORK/docs.tar.zst' && sync -d '$WORK/docs.tar.zst'" ;;
    docs_local)
      measure docs_local env "${LOCAL[@]}" DOCUMENTS_STORAGE_ROOT="$DOCS" BACKUP__DOCUMENTS__ENABLED=true "$BIN" run documents ;;
    docs_crm)
      measure docs_crm env DOCUMENTS_STORAGE_ROOT="$DOCS" BACKUP__DOCUMENTS__ENABLED=true "$BIN" run documents ;;
    docs_base)
      measure docs_base env "${LOCAL[@]}" BACKUP_CONFIG_DIR="$BASE_CONFIG" DOCUMENTS_STORAGE_ROOT="$DOCS" BACKUP__DOCUMENTS__ENABLED=true "$BASE" run documents ;;
    restic)
      # A full backup into a fresh repository each time (into the same one, every round
      # after the first would skip the unchanged files); the repository's creation, with
      # its key derivation, is not timed.
      restic init -q >/dev/null
      measure restic restic backup -q "$DOCS" ;;
  esac
  rm -rf "$WORK/docs.tar.zst" "$WORK/local" "$WORK/restic-repository"
}
DOCS_COMMANDS=(tar_zstd docs_local tar_zstd_sync docs_crm)
[ -n "$BASE" ] && DOCS_COMMANDS+=(docs_base)
if command -v restic >/dev/null; then
  DOCS_COMMANDS+=(restic)
  export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$WORK/restic-repository" RESTIC_CACHE_DIR="$WORK/restic-cache"
fi
for round in $(seq 1 "$ROUNDS"); do
  echo "documents round $round/$ROUNDS" >&2
  run_rotated "$round" docs_run "${DOCS_COMMANDS[@]}"
done
fi

echo
table_head reference
if [[ $TARGETS == *" redis "* ]]; then
  row "\`redis-cli --rdb file\` (${REDIS_MEM} in Redis)" redis_cli redis_cli
  row '`crm-backup run redis` (local directory)' redis_local redis_cli
  row '`crm-backup run redis` (to Garage)' redis_crm redis_cli
  [ -n "$BASE" ] && row "baseline \`$BASE run redis\` (local directory)" redis_base redis_cli
fi
if [[ $TARGETS == *" documents "* ]]; then
  row "\`tar -cf - | zstd -3 -T0 > file\` ($DOCS_FILES files, $DOCS_SIZE)" tar_zstd tar_zstd
  row '`crm-backup run documents` (local directory)' docs_local tar_zstd
  row '`crm-backup run documents` (to Garage)' docs_crm tar_zstd
  [ -n "$BASE" ] && row "baseline \`$BASE run documents\` (local directory)" docs_base tar_zstd
  row '`tar -cf - | zstd -3 -T0 > file && sync -d file` (durable, as crm-backup)' tar_zstd_sync tar_zstd
  printf '| `crm-backup run documents` (local directory) vs the durable reference | | | %sx | | |\n' \
    "$(div "$(col docs_local 1)" "$(col tar_zstd_sync 1)")"
fi
[ -f "$WORK/restic" ] && row "\`restic backup\` (restic $(restic version | cut -d' ' -f2), a new repository each round)" restic tar_zstd
printf '\nmedians of %s rounds; seconds of each round:\n' "$ROUNDS"
rounds redis_cli redis_local redis_crm redis_base tar_zstd tar_zstd_sync docs_local docs_crm docs_base restic
