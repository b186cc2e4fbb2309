#!/usr/bin/env bash
# Starts (and on first use installs and configures) a single-node Garage S3 server for tests.
# Idempotent: reuses a running instance. Prints `export` lines for the test environment.
# `scripts/garage.sh stop` stops the server (the outage tests), and the next run starts it.
#
# State lives outside the checkout (GARAGE_HOME, default ~/.cache/crm-backup/garage) so
# every clone on the machine shares one server. Test-only credentials: never use them elsewhere.
set -euo pipefail

GARAGE_HOME=${GARAGE_HOME:-$HOME/.cache/crm-backup/garage}
S3_PORT=${GARAGE_S3_PORT:-39000}
RPC_PORT=${GARAGE_RPC_PORT:-39001}
ADMIN_PORT=${GARAGE_ADMIN_PORT:-39003}
BUCKET=${GARAGE_BUCKET:-crm-backup-test}
KEY_ID=GK0c7e5a1b9d3f2e4a6c8b0d1e
SECRET=6f1c2d3e4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d

log() { echo "garage.sh: $*" >&2; }

if ! command -v garage >/dev/null 2>&1; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v garage >/dev/null 2>&1; then
  log "garage is not installed: cargo install garage --locked (about 16 minutes on 2 cores)"
  cargo install garage --locked >&2
fi

mkdir -p "$GARAGE_HOME/meta" "$GARAGE_HOME/data"
CONFIG="$GARAGE_HOME/garage.toml"
if [ "${1:-}" = stop ]; then
  # Stops the server (tests of a storage outage); the next run without `stop` starts it.
  pkill -f "garage -c $CONFIG server" 2>/dev/null || true
  for _ in $(seq 1 100); do
    pgrep -f "garage -c $CONFIG server" >/dev/null || exit 0
    sleep 0.1
  done
  log "garage did not stop"; exit 1
fi
if [ ! -f "$CONFIG" ]; then
  cat > "$CONFIG" <<TOML
metadata_dir = "$GARAGE_HOME/meta"
data_dir = "$GARAGE_HOME/data"
db_engine = "sqlite"
replication_factor = 1
# Artifacts arrive zstd-compressed (and often age-encrypted): compressing them again
# only costs CPU next to the databases being backed up.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
TOML
  chmod 600 "$CONFIG"
fi
g() { garage -c "$CONFIG" "$@"; }
if ! grep -q '^compression_level' "$CONFIG"; then
  # Written by an earlier version of this script: add the setting, restart to apply it.
  sed -i 's/^replication_factor = 1$/&\ncompression_level = "none"/' "$CONFIG"
  pkill -f "garage -c $CONFIG server" 2>/dev/null && sleep 1 || true
fi

if ! g status >/dev/null 2>&1; then
  log "starting garage server ($GARAGE_HOME)"
  nohup garage -c "$CONFIG" server >"$GARAGE_HOME/server.log" 2>&1 &
  for _ in $(seq 1 100); do
    g status >/dev/null 2>&1 && break
    sleep 0.2
  done
  g status >/dev/null 2>&1 || { log "garage did not start; see $GARAGE_HOME/server.log"; exit 1; }
fi

if g status 2>/dev/null | grep -q "NO ROLE ASSIGNED"; then
  node_id=$(g node id -q 2>/dev/null | cut -d@ -f1)
  g layout assign -z dc1 -c 100G "$node_id" >&2
  version=$(( $(g layout show 2>/dev/null | sed -n 's/.*Current cluster layout version: \([0-9]*\).*/\1/p' | head -1) + 1 ))
  g layout apply --version "$version" >&2
fi
if ! g key info "$KEY_ID" >/dev/null 2>&1; then
  g key import --yes -n crm-backup-test "$KEY_ID" "$SECRET" >&2
fi
if ! g bucket info "$BUCKET" >/dev/null 2>&1; then
  g bucket create "$BUCKET" >&2
fi
g bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null

# Wait until the S3 API answers (the layout takes a moment to apply).
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" && break
  sleep 0.2
done

cat <<ENV
export BACKUP_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export BACKUP_TEST_S3_BUCKET=$BUCKET
export BACKUP_TEST_S3_REGION=garage
export BACKUP_TEST_S3_ACCESS_KEY=$KEY_ID
export BACKUP_TEST_S3_SECRET_KEY=$SECRET
export BACKUP_TEST_GARAGE_CONFIG=$CONFIG
ENV
