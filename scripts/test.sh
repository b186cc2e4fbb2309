#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: checks every service and tool the tests
# need, starts or installs what is missing, then runs all tests against the real things.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

say() { echo "test.sh: $*" >&2; }

apt_install() {
  say "installing $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  fi
}

need() { # <command> <debian package>
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

ensure_tools() {
  need zstd zstd
  need age age
  need minisign minisign
  need curl curl
  need jq jq
  need psql postgresql-client
  need redis-server redis-server
  need redis-cli redis-tools
  need nm binutils
  need openssl openssl
  need promtool prometheus
}

ensure_postgres() {
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do
      pg_isready -h 127.0.0.1 -p 5432 -q && break
      sleep 0.5
    done
    pg_isready -h 127.0.0.1 -p 5432 -q || { say "PostgreSQL did not start"; exit 1; }
  fi
  # Trust auth on the development machines; a stock Debian cluster wants a password.
  TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
  if ! psql -X -q -d "$TEST_DATABASE_URL/postgres" -c 'SELECT 1' >/dev/null 2>&1; then
    say "setting a password for the postgres role (test machine)"
    runuser -u postgres -- psql -X -q -c "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
    TEST_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432
  fi
  export TEST_DATABASE_URL
}

# TLS to PostgreSQL: the server presents a certificate for `localhost` signed by a CA the
# suite made (TEST_PG_TLS_CA), and refuses role crm_backup_tls_only without TLS.
ensure_postgres_tls() {
  local dir=/var/lib/postgresql/crm-backup-test-tls
  if [ ! -f "$dir/server.crt" ]; then
    say "making a test CA and a server certificate for PostgreSQL (localhost)"
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=crm-backup test CA" \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost\n' > "$dir/san.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 3650 -extfile "$dir/san.ext" -out "$dir/server.crt" 2>/dev/null
    chmod 600 "$dir/server.key" "$dir/ca.key"
    chown -R postgres:postgres "$dir" 2>/dev/null || true
  fi
  local sql=(psql -X -q -At -d "$TEST_DATABASE_URL/postgres")
  if [ "$("${sql[@]}" -c 'SHOW ssl_cert_file')" != "$dir/server.crt" ] || [ "$("${sql[@]}" -c 'SHOW ssl')" != on ]; then
    say "PostgreSQL: ssl = on with the test certificate"
    "${sql[@]}" -c "ALTER SYSTEM SET ssl_cert_file = '$dir/server.crt'" \
      -c "ALTER SYSTEM SET ssl_key_file = '$dir/server.key'" -c "ALTER SYSTEM SET ssl = on" \
      -c "SELECT pg_reload_conf()" >/dev/null
  fi
  "${sql[@]}" -c "DO \$\$BEGIN CREATE ROLE crm_backup_tls_only LOGIN SUPERUSER; EXCEPTION WHEN duplicate_object THEN NULL; END\$\$" \
    -c "ALTER ROLE crm_backup_tls_only PASSWORD 'tls-only'" >/dev/null
  local hba; hba=$("${sql[@]}" -c 'SHOW hba_file')
  if ! grep -q crm_backup_tls_only "$hba"; then
    say "PostgreSQL: role crm_backup_tls_only only over TLS ($hba)"
    sed -i '1i hostnossl all crm_backup_tls_only all reject' "$hba"
    "${sql[@]}" -c "SELECT pg_reload_conf()" >/dev/null
  fi
  sleep 0.5
  export TEST_PG_TLS_CA=$dir/ca.crt
}

ensure_redis() {
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    say "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 50); do
      redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
      sleep 0.2
    done
  fi
}

ensure_rabbitmq() {
  if ! command -v rabbitmqctl >/dev/null 2>&1; then
    apt_install rabbitmq-server
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    say "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    rabbitmqctl -q await_startup --timeout 120 >/dev/null
  fi
  if ! curl -s -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview; then
    say "enabling the RabbitMQ management plugin"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    for _ in $(seq 1 120); do
      curl -s -o /dev/null -u guest:guest http://127.0.0.1:15672/api/overview && break
      sleep 0.5
    done
  fi
  export TEST_RABBITMQ_URL=${TEST_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672}
  export TEST_RABBITMQ_MANAGEMENT_URL=${TEST_RABBITMQ_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}
}

ensure_python() {
  python3 -c 'import pika' 2>/dev/null || { say "installing pika"; python3 -m pip install -q pika >/dev/null; }
}

ensure_garage() {
  local env
  env=$(./scripts/garage.sh)
  eval "$env"
}

ensure_tools
ensure_postgres
ensure_postgres_tls
ensure_redis
ensure_rabbitmq
ensure_python
ensure_garage

say "running the test suite"
cargo test --all-targets --locked --no-fail-fast "$@"
