#!/usr/bin/env bash
# Reliability campaign: fuzzing of every parser of outside bytes, and of the worker with
# generated command messages, against the real services (run ./scripts/test.sh once first: it
# starts them and Garage). Prints one table row per scenario.
#
#   scripts/reliability.sh            # 1,000,000 inputs per parser, 10,000 messages, 1,000 tamperings
#   RELIABILITY_CASES=20000 RELIABILITY_MESSAGES=1000 RELIABILITY_TAMPERS=200 scripts/reliability.sh
#
# The test suite runs the same scenarios short (2,000 inputs per parser, 300 messages, 120
# tamperings) and fails on any panic, lost message, second final event or missed tampering.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

CASES=${RELIABILITY_CASES:-1000000}
MESSAGES=${RELIABILITY_MESSAGES:-10000}
TAMPERS=${RELIABILITY_TAMPERS:-1000}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
export TEST_RABBITMQ_URL=${TEST_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672}
export TEST_RABBITMQ_MANAGEMENT_URL=${TEST_RABBITMQ_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}
eval "$(./scripts/garage.sh)"

rows=()
failed_logs=()

# scenario <log name> <what> <runs> <summary pattern> <command…>: runs the command, adds a row.
scenario() {
  local name=$1 what=$2 runs=$3 pattern=$4 ok=yes start
  shift 4
  start=$(date +%s)
  if ! "$@" >"$LOG/$name" 2>&1; then
    ok=no
    failed_logs+=("$LOG/$name")
  fi
  local summary
  summary=$(grep -o "$pattern" "$LOG/$name" | head -1 || true)
  rows+=("| $what | $runs | ${summary:-see the log} | $(( $(date +%s) - start )) s | $ok |")
}

# Parsers: PROPTEST_CASES inputs for each property (release build: the inputs are many).
scenario parsers \
  "parsers (RESP sync payload, RDB, key stream, pg_dump archive, command, manifest, Consul KV, RabbitMQ definitions, documents archives and index paths)" \
  "$CASES inputs per property" 'test result: .*' \
  env PROPTEST_CASES="$CASES" cargo test --release --locked -q --lib fuzz:: -- --test-threads 2

# The worker: generated messages of every kind through the real broker.
scenario messages \
  "worker: generated command messages (schema-aware, mutated, random bytes, 2 MiB, nested 100k deep, odd content types and headers)" \
  "$MESSAGES messages" 'fuzz: .*' \
  env FUZZ_MESSAGES="$MESSAGES" cargo test --locked -q --test worker \
  generated_messages_each_end_in_one_final_event_and_the_worker_stays_up -- --nocapture

# Tampering: flips, cuts and appends of artifacts and manifests; verify and restore refuse.
scenario tampering \
  "tampering of stored artifacts and manifests (PostgreSQL, documents; encrypted, signed)" \
  "$TAMPERS changes, every other pair also restored" 'tampering: .*' \
  env TAMPER_CASES="$TAMPERS" cargo test --locked -q --test tampering -- --nocapture

printf '\n| scenario | runs | result | time | passed |\n|---|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
if [ ${#failed_logs[@]} -gt 0 ]; then
  echo
  tail -50 "${failed_logs[@]}"
  exit 1
fi
