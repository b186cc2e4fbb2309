#!/usr/bin/env bash
# Reliability campaign against the real services (run ./scripts/test.sh once first: it starts
# them and Garage): workers SIGKILLed at random moments, services restarted and storage
# stopped mid-step, fuzzing of every parser of outside bytes and of the worker with generated
# command messages, tampering. Prints one table row per scenario. It stops and starts Garage
# and RabbitMQ: run it on a machine of its own.
#
#   scripts/reliability.sh      # 3 runs of each fault, 60 s outages, 40 kills a run,
#                               # 1,000,000 inputs per parser, 10,000 messages, 1,000 tamperings
#   RELIABILITY_RUNS=1 RELIABILITY_OUTAGE=20 RELIABILITY_CASES=20000 RELIABILITY_MESSAGES=1000 \
#     RELIABILITY_TAMPERS=200 RELIABILITY_KILLS=20 scripts/reliability.sh
#   RELIABILITY_ONLY=faults scripts/reliability.sh    # or: fuzzing, scale-out
#
# The test suite runs the same scenarios short (8 kills, 15 s outages, 2,000 inputs per
# parser, 300 messages, 120 tamperings) and fails on any loss, duplicate, corruption or panic.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

RUNS=${RELIABILITY_RUNS:-3}
OUTAGE=${RELIABILITY_OUTAGE:-60}
KILLS=${RELIABILITY_KILLS:-40}
ONLY=${RELIABILITY_ONLY:-all}
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
tally_rows=()
failed_logs=()

# scenario <log name> <what> <runs> <summary pattern> <command…>: runs the command. Its runs'
# `tally:` lines (tests/common/tally.rs) become rows of the faults table, one per scenario
# they name; without them, a row of the other table holds the lines matching the pattern.
scenario() {
  local name=$1 what=$2 runs=$3 pattern=$4 ok=yes start
  shift 4
  start=$(date +%s)
  if ! "$@" >"$LOG/$name" 2>&1; then
    ok=no
    failed_logs+=("$LOG/$name")
  fi
  local seconds=$(( $(date +%s) - start ))
  if grep -q 'tally: ' "$LOG/$name"; then
    while IFS= read -r row; do
      tally_rows+=("$row $seconds s | $ok |")
    done < <(tally "$LOG/$name")
    return
  fi
  local summary
  summary=$(grep -o "$pattern" "$LOG/$name" | sort | uniq -c | sed 's/^ *//' | paste -sd ';' - || true)
  rows+=("| $what | $runs | ${summary:-see the log} | $seconds s | $ok |")
}

# tally <log>: one row per scenario named by the log's `tally:` lines: the runs that passed,
# the sums of their counts, and their figures (each with how many runs gave it).
tally() {
  awk '
    {
      at = index($0, "tally: ")
      if (at == 0) next
      n_parts = split(substr($0, at + 7), part, / [|] /)
      if (n_parts < 3) next
      key = part[1]
      if (!(key in runs)) order[++n] = key
      runs[key]++
      split(part[2], fields, " ")
      for (i in fields) { split(fields[i], kv, "="); sum[key, kv[1]] += kv[2] }
      if (!((key, part[3]) in seen)) { kinds[key]++; figure[key, kinds[key]] = part[3] }
      seen[key, part[3]]++
    }
    END {
      for (j = 1; j <= n; j++) {
        key = order[j]
        figures = ""
        for (f = 1; f <= kinds[key]; f++) {
          text = figure[key, f]
          figures = figures (f > 1 ? "; " : "") (runs[key] > 1 ? seen[key, text] "x: " : "") text
        }
        printf "| %s | %d | %d | %d | %d | %d | %d | %d | %d | %s |\n", key, runs[key], sum[key, "commands"], \
          sum[key, "lost"], sum[key, "duplicated"], sum[key, "corrupt"], sum[key, "orphaned"], sum[key, "panics"], \
          sum[key, "restarts"], figures
      }
    }
    ' "$1"
}

# repeat <n> <command…>: the command n times; stops at the first failure.
repeat() {
  local n=$1 i
  shift
  for i in $(seq 1 "$n"); do
    echo "run $i of $n"
    "$@" || return 1
  done
}

if [ "$ONLY" = all ] || [ "$ONLY" = faults ]; then
# Two worker processes, a random one SIGKILLed every 0.3-2.5 s and replaced, over backup,
# verify, drill, restore and prune of all five targets.
scenario kills \
  "SIGKILL of a random worker of two, at random moments, across every action and target" \
  "$RUNS runs, $KILLS kills or more each" 'kills: .*' \
  repeat "$RUNS" env KILLS="$KILLS" cargo test --locked -q --test kill_campaign -- --nocapture

# Services restarted mid-step (the tests start their own servers).
scenario restarts \
  "PostgreSQL restarted mid-dump (pg_ctl restart -m fast); Redis restarted mid-RDB, diskless and disk-based" \
  "$RUNS runs" 'restart: .*' \
  repeat "$RUNS" cargo test --locked -q --test postgres --test redis restarted -- --nocapture

# Garage stopped mid-upload, under a worker and past the retry budget; the broker stopped
# mid-step with stop_app, then as a whole node.
scenario storage \
  "S3 (Garage) stopped for ${OUTAGE} s mid-upload under a worker; stopped past the retry budget" \
  "$RUNS runs" 'outage: storage.*' \
  repeat "$RUNS" env OUTAGE_SECS="$OUTAGE" cargo test --locked -q --test outages storage_down -- --nocapture
scenario broker \
  "RabbitMQ stop_app for ${OUTAGE} s mid-step, then start_app" \
  "$RUNS runs" 'outage: broker.*' \
  repeat "$RUNS" env OUTAGE_SECS="$OUTAGE" cargo test --locked -q --test outages a_broker -- --nocapture
scenario broker_node \
  "RabbitMQ node stopped (rabbitmqctl stop) for ${OUTAGE} s mid-step, then started" \
  "$RUNS runs" 'outage: broker.*' \
  repeat "$RUNS" env OUTAGE_BROKER=node OUTAGE_SECS="$OUTAGE" cargo test --locked -q --test outages a_broker -- --nocapture
fi

if [ "$ONLY" = all ] || [ "$ONLY" = fuzzing ]; then

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

fi

if [ ${#tally_rows[@]} -gt 0 ]; then
  printf '\n| scenario | runs passed | commands | lost | duplicated | corrupt | orphaned | panics | worker restarts needed | the scenario'"'"'s own figure | time | passed |\n'
  printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
  printf '%s\n' "${tally_rows[@]}"
fi
if [ ${#rows[@]} -gt 0 ]; then
  printf '\n| scenario | runs | result | time | passed |\n|---|---|---|---|---|\n'
  printf '%s\n' "${rows[@]}"
fi

# Scale-out: its own table (scripts/bench-scale-out.sh).
if [ "$ONLY" = all ] || [ "$ONLY" = scale-out ]; then
  echo
  ./scripts/bench-scale-out.sh || failed_logs+=(/dev/null)
fi
if [ ${#failed_logs[@]} -gt 0 ]; then
  echo
  tail -50 "${failed_logs[@]}"
  exit 1
fi
