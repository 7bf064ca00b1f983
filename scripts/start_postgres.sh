#!/usr/bin/env bash
# Start (or reuse) a throwaway local PostgreSQL server for the multi-worker tuning test and
# print its URL on stdout -- nothing else goes to stdout, so this works:
#
#     export POPPRIOR_TEST_POSTGRES_URL="$(bash scripts/start_postgres.sh)"
#
# Idempotent: a second call finds the running server and prints the same URL. Installs
# Debian's `postgresql` package when no server binaries are found (needs root and apt-get).
# Listens on 127.0.0.1 only. Settings (environment):
#   POPPRIOR_PG_DIR   cluster folder        (default /tmp/popprior-postgres)
#   POPPRIOR_PG_PORT  port to try first     (default 55432; the next free one is used)
#   POPPRIOR_PG_USER / POPPRIOR_PG_PASSWORD / POPPRIOR_PG_DB   (default popprior for all three)
# Stop it with:  bash scripts/start_postgres.sh --stop
set -euo pipefail

DIR="${POPPRIOR_PG_DIR:-/tmp/popprior-postgres}"
PORT="${POPPRIOR_PG_PORT:-55432}"
DB_USER="${POPPRIOR_PG_USER:-popprior}"
DB_PASSWORD="${POPPRIOR_PG_PASSWORD:-popprior}"
DB_NAME="${POPPRIOR_PG_DB:-popprior}"

log() { echo "start_postgres: $*" >&2; }

find_bin() {
  local initdb
  initdb="$(ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -z "$initdb" ]] && command -v initdb >/dev/null 2>&1; then
    initdb="$(command -v initdb)"
  fi
  [[ -n "$initdb" ]] && dirname "$(readlink -f "$initdb")"
}

PGBIN="$(find_bin || true)"
if [[ -z "$PGBIN" ]]; then
  command -v apt-get >/dev/null 2>&1 || { log "no PostgreSQL server found and no apt-get to install one"; exit 1; }
  log "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends postgresql >&2
  PGBIN="$(find_bin)"
fi

# PostgreSQL refuses to run as root: run its tools as the `postgres` system user then.
as_pg() {
  if [[ "$(id -u)" == 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

if [[ "${1:-}" == "--stop" ]]; then
  if [[ -f "$DIR/data/PG_VERSION" ]]; then
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
  fi
  exit 0
fi

url() { echo "postgresql://${DB_USER}:${DB_PASSWORD}@127.0.0.1:$(cat "$DIR/port")/${DB_NAME}"; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

mkdir -p "$DIR"
[[ "$(id -u)" == 0 ]] && chown postgres: "$DIR"

if [[ -f "$DIR/data/PG_VERSION" ]] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  log "reusing the running server in $DIR"
  url
  exit 0
fi

if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
  log "creating a cluster in $DIR/data"
  as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --no-instructions >&2
fi

while port_busy "$PORT"; do PORT=$((PORT + 1)); done
echo "$PORT" > "$DIR/port"
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$DIR -c max_connections=100" \
  start >&2

psql_pg() { as_pg psql -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
if [[ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]]; then
  psql_pg -c "CREATE ROLE \"$DB_USER\" LOGIN PASSWORD '$DB_PASSWORD'" >&2
fi
if [[ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
  psql_pg -c "CREATE DATABASE \"$DB_NAME\" OWNER \"$DB_USER\"" >&2
fi
log "server on 127.0.0.1:$PORT (log: $DIR/server.log)"
url
