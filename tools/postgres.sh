#!/usr/bin/env bash
# A PostgreSQL server on loopback, for the shared-storage test of `fakegpt tune` and for local multi-worker studies.
#   export FAKEGPT_TEST_POSTGRES_URL=$(bash tools/postgres.sh)   # start (or reuse) it; prints the SQLAlchemy URL
#   bash tools/postgres.sh stop                                  # stop it (the data folder stays)
#   bash tools/postgres.sh status                                # exit status 0 if it is running
# Installs Debian's postgresql with apt when it is missing (as root), keeps its cluster in $FAKEGPT_PG_DIR
# (default /var/tmp/fakegpt-postgres), listens on 127.0.0.1:$FAKEGPT_PG_PORT (default 54329) only, and creates
# the user and database `fakegpt` (password `fakegpt`: a throwaway server on loopback, not for real data).
# Idempotent: a server that is already running is reused, so a second call takes well under a second.
# Progress goes to stderr; stdout is only the URL.
set -euo pipefail
PORT=${FAKEGPT_PG_PORT:-54329}
DIR=${FAKEGPT_PG_DIR:-/var/tmp/fakegpt-postgres}
NAME=fakegpt
say() { echo "postgres.sh: $*" >&2; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
BIN=$(pg_bin)
if [ -z "$BIN" ] && command -v pg_ctl >/dev/null 2>&1; then BIN=$(dirname "$(command -v pg_ctl)"); fi
case "${1:-start}" in
  start) ;;
  stop) [ -n "$BIN" ] && [ -f "$DIR/data/PG_VERSION" ] || exit 0 ;;
  status) [ -n "$BIN" ] && [ -f "$DIR/data/postmaster.pid" ] && kill -0 "$(head -n 1 "$DIR/data/postmaster.pid")" \
            2>/dev/null; exit ;;
  *) say "usage: bash tools/postgres.sh [start | stop | status]"; exit 2 ;;
esac
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "PostgreSQL is not installed; install it (Debian: apt-get install postgresql) or run this as root"
    exit 1
  fi
  say "installing Debian's postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  BIN=$(pg_bin)
fi

# The server refuses to run as root: as root, run it as Debian's `postgres` system user.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  as_pg() { runuser -u postgres -- "$@"; }
  mkdir -p "$DIR" && chown postgres: "$DIR" && chmod 700 "$DIR"
else
  as_pg() { "$@"; }
  mkdir -p "$DIR" && chmod 700 "$DIR"
fi
PGDATA="$DIR/data"

if [ "${1:-start}" = stop ]; then
  as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1 && as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >&2
  exit 0
fi

if [ ! -f "$PGDATA/PG_VERSION" ]; then
  say "creating a cluster in $PGDATA"
  # Local socket: trust (only this machine's users can reach $DIR); TCP on loopback: password.
  as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >/dev/null
fi
if ! as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  say "starting the server on 127.0.0.1:$PORT"
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >/dev/null ||
    { say "the server did not start; its log:"; tail -n 20 "$DIR/server.log" >&2; exit 1; }
fi

sql() { as_pg "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAqc "$1"; }
if [ -z "$(sql "SELECT 1 FROM pg_roles WHERE rolname = '$NAME'")" ]; then
  sql "CREATE ROLE $NAME LOGIN PASSWORD '$NAME'" >/dev/null
fi
if [ -z "$(sql "SELECT 1 FROM pg_database WHERE datname = '$NAME'")" ]; then
  sql "CREATE DATABASE $NAME OWNER $NAME" >/dev/null
fi
echo "postgresql+psycopg://$NAME:$NAME@127.0.0.1:$PORT/$NAME"
