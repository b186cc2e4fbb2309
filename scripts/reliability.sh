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

# Parsers: PROPTEST_CASES inputs for each property (release build: the inputs are many).
start=$(date +%s)
if PROPTEST_CASES=$CASES cargo test --release --locked -q --lib fuzz:: -- --test-threads 2 \
    >"$LOG/parsers" 2>&1; then
  parsers_ok=yes
else
  parsers_ok=no
fi
properties=$(grep -c '^test fuzz::.* ok$' "$LOG/parsers" || true)
failed=$(grep -c '^test fuzz::.* FAILED$' "$LOG/parsers" || true)
rows+=("| parsers (RESP sync payload, RDB, key stream, pg_dump archive, command, manifest, Consul KV, RabbitMQ definitions, documents archives and index paths) | $properties properties x $CASES inputs | $failed failing | $(( $(date +%s) - start )) s | $parsers_ok |")

# The worker: generated messages of every kind through the real broker.
start=$(date +%s)
if FUZZ_MESSAGES=$MESSAGES cargo test --locked -q --test worker \
    generated_messages_each_end_in_one_final_event_and_the_worker_stays_up -- --nocapture \
    >"$LOG/messages" 2>&1; then
  messages_ok=yes
else
  messages_ok=no
fi
summary=$(grep -o 'fuzz: .*' "$LOG/messages" | head -1)
rows+=("| worker: generated command messages (schema-aware, mutated, random bytes, 2 MiB, nested 100k deep, odd content types and headers) | $MESSAGES messages | ${summary:-see the log} | $(( $(date +%s) - start )) s | $messages_ok |")

# Tampering: flips, cuts and appends of artifacts and manifests; verify and restore refuse.
start=$(date +%s)
if TAMPER_CASES=$TAMPERS cargo test --locked -q --test tampering -- --nocapture \
    >"$LOG/tampering" 2>&1; then
  tampering_ok=yes
else
  tampering_ok=no
fi
summary=$(grep -o 'tampering: .*' "$LOG/tampering" | head -1)
rows+=("| tampering of stored artifacts and manifests (PostgreSQL, documents; encrypted, signed) | $TAMPERS changes, every other pair also restored | ${summary:-see the log} | $(( $(date +%s) - start )) s | $tampering_ok |")

printf '\n| scenario | runs | result | time | passed |\n|---|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
if [ "$parsers_ok" != yes ] || [ "$messages_ok" != yes ] || [ "$tampering_ok" != yes ]; then
  echo
  tail -50 "$LOG/parsers" "$LOG/messages" "$LOG/tampering"
  exit 1
fi
