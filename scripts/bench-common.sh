# Helpers shared by the benchmark scripts (sourced, not run). Each measured command appends
# one line "seconds peak_kib machine_cpu_seconds" to $WORK/<label>:
#   - seconds and peak RSS of the command (and its children) from /usr/bin/time -v's fields;
#   - CPU time of the whole machine while it ran (/proc/stat: user+nice+system+irq+softirq),
#     which includes what the command makes other processes do (the PostgreSQL backend that
#     serves pg_dump, the Redis fork that writes the RDB, Garage). Divided by the number of
#     cores it is the shortest time that work can take here: the floor under any ratio.
# Every command starts after `sync`: the previous command's files (a gigabyte each for the
# documents runs) are written back before the clock starts, not during the next command,
# where the kernel's writeback would take disk and CPU time from whichever ran next. Then it
# waits until the machine is idle (`quiesce`): Garage goes on storing what a run sent it for
# a while after the run returns, and that work would be charged to the next command. Each
# command still pays for its own writes as it makes them: crm-backup's local storage
# fdatasyncs its artifact before it returns, `zstd > file` does not.
# Needs $WORK (a scratch directory) set by the caller.

command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null

CORES=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# Waits until the whole machine is nearly idle (under 15% of one core over 0.2 s), at most 10 s.
quiesce() {
  local i before after
  for i in $(seq 1 50); do
    before=$(busy_ticks)
    sleep 0.2
    after=$(busy_ticks)
    [ $((after - before)) -le $((CLK_TCK * 3 / 100)) ] && return 0
  done
  echo "bench: the machine did not become idle; measuring anyway" >&2
}

measure() { # <label> <command...>
  local label=$1; shift
  local before after
  sync
  quiesce
  before=$(busy_ticks)
  /usr/bin/time -f "%e %M" -o "$WORK/one" "$@" >/dev/null
  after=$(busy_ticks)
  printf '%s %s\n' "$(cat "$WORK/one")" "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')" >> "$WORK/$label"
}

# Runs round <round> of the commands <label>... through <runner> (a function taking one
# label), in an order that rotates from round to round: each command runs first, second…
# equally often, so what one leaves behind (Garage storing what a run sent it, memory to
# reclaim) does not always fall on the same other command. With a fixed order the reference
# commands always ran right after the run to Garage: earlier sessions' documents ratios of
# 0.94x-1.11x came from that (1.28x rotated).
run_rotated() { # <round> <runner> <label>...
  local round=$1 runner=$2; shift 2
  local labels=("$@") k
  for k in "${!labels[@]}"; do
    "$runner" "${labels[$(( (k + round - 1) % ${#labels[@]} ))]}"
  done
}

rounds() { # <label>...: each label's seconds, round by round (the spread behind a median)
  local label
  for label in "$@"; do
    [ -f "$WORK/$label" ] && printf '%s: %s\n' "$label" "$(awk '{printf "%s ", $1}' "$WORK/$label")"
  done
  return 0
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { awk -v c="$2" '{print $c}' "$WORK/$1" | median; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

table_head() {
  printf '| run | seconds | peak RSS (MiB) | time vs %s | machine CPU s | CPU floor s (÷%s cores) |\n' "$1" "$CORES"
  printf '|---|---|---|---|---|---|\n'
}

row() { # <name> <label> <baseline label>
  local cpu; cpu=$(col "$2" 3)
  printf '| %s | %s | %s | %sx | %s | %s |\n' "$1" "$(col "$2" 1)" "$(div "$(col "$2" 2)" 1024)" \
    "$(div "$(col "$2" 1)" "$(col "$3" 1)")" "$cpu" "$(div "$cpu" "$CORES")"
}

# The PostgreSQL benchmarks' tools, Garage, and this tree's release build in $BIN.
postgres_bench_setup() {
  command -v pgbench >/dev/null || apt-get install -y -q postgresql-contrib >/dev/null
  command -v zstd >/dev/null || apt-get install -y -q zstd >/dev/null
  command -v minisign >/dev/null || apt-get install -y -q minisign >/dev/null
  eval "$(./scripts/garage.sh)"
  cargo build --release --locked -q
  BIN=$PWD/target/release/crm-backup
}

pgbench_db() { # <scale>: the database pgbench made at that scale (made once), its name on stdout
  local db=crm_bench_$1
  if [ "$(psql -X -At -d "$PG/postgres" -c "SELECT count(*) FROM pg_database WHERE datname = '$db'")" = 0 ]; then
    echo "creating $db with pgbench -i -s $1 ..." >&2
    psql -X -q -d "$PG/postgres" -c "CREATE DATABASE $db"
    pgbench -i -q -s "$1" "$PG/$db" >&2
  fi
  echo "$db"
}

use_garage() { # crm-backup writes to the Garage bucket, under bench/<time>
  export BACKUP_S3_ENDPOINT="$BACKUP_TEST_S3_ENDPOINT" BACKUP_S3_BUCKET="$BACKUP_TEST_S3_BUCKET" \
    BACKUP_S3_REGION="$BACKUP_TEST_S3_REGION" BACKUP_S3_ACCESS_KEY="$BACKUP_TEST_S3_ACCESS_KEY" \
    BACKUP_S3_SECRET_KEY="$BACKUP_TEST_S3_SECRET_KEY" BACKUP_STORAGE_PREFIX="bench/$(date +%s)"
}

# Worker benchmarks (bench-messaging.sh, bench-scale-out.sh) against the local RabbitMQ: a
# vhost of their own per run ($MGMT: the management API), and worker processes in $PIDS.
make_vhost() { # <vhost>: created, guest may do everything in it
  curl -s -f -X PUT -H 'content-type: application/json' -d '{}' "$MGMT/api/vhosts/$1" >/dev/null
  curl -s -f -X PUT -H 'content-type: application/json' -d '{"configure":".*","write":".*","read":".*"}' \
    "$MGMT/api/permissions/$1/guest" >/dev/null
}
start_workers() { # <binary> <count>: workers logging to $WORK/worker.log, given a second to consume
  local _
  PIDS=()
  for _ in $(seq 1 "$2"); do
    "$1" worker 2>>"$WORK/worker.log" &
    PIDS+=($!)
  done
  sleep 1
}
stop_workers() { # SIGTERM to every worker, then wait for them
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}
