#!/usr/bin/env bash
# User-space instructions per transaction of dbproxy (session and transaction mode) and of
# pgbouncer, counted by valgrind's callgrind: unlike CPU time, the count does not move with
# the load of a shared machine, so small changes to the hot path can be compared.
#
#   bench/instructions.sh [TRANSACTIONS_PER_CLIENT]      (default 2500, 4 clients)
#
# Starts a throwaway PostgreSQL on a free port (as `nobody` when run as root), then for each
# proxy: starts it under callgrind, warms it up with 300 pgbench select-only transactions per
# client, zeroes the counters, runs the measured transactions (simple protocol, 4 clients),
# dumps the counters and divides. Client logins of the measured run are included (4 per run).
# Needs valgrind, pgbench, PostgreSQL's server binaries and (optionally) pgbouncer;
# DBPROXY_BIN overrides the dbproxy binary (default: target/release/dbproxy, built here);
# DBPROXY_ARGS adds flags to its command line (e.g. "--client-park-after-ms 1000");
# TARGETS picks some of "dbproxy-session dbproxy-transaction pgbouncer-session
# pgbouncer-transaction"; KEEP=DIR keeps the callgrind dumps there (for callgrind_annotate).
set -euo pipefail
[ -n "${TRACE:-}" ] && set -x

N=${1:-2500}
CLIENTS=4
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for tool in valgrind callgrind_control pgbench pg_isready; do
    command -v "$tool" >/dev/null || {
        echo "instructions.sh: $tool is missing (Debian: apt-get install -y valgrind postgresql postgresql-contrib)" >&2
        exit 1
    }
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGBIN/initdb" ] || {
    echo "instructions.sh: initdb not found under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)" >&2
    exit 1
}
if [ -z "${DBPROXY_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -p dbproxy >/dev/null)
    DBPROXY_BIN=$ROOT/target/release/dbproxy
fi

WORK=$(mktemp -d /tmp/dbproxy-instructions.XXXXXX)
chmod 755 "$WORK"
AS=()
if [ "$(id -u)" = 0 ]; then
    chown nobody "$WORK"
    AS=(su nobody -s /bin/sh -c)
fi
as_user() {
    if [ ${#AS[@]} -gt 0 ]; then "${AS[@]}" "$*"; else sh -c "$*"; fi
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PGPORT=$(free_port)
cleanup() {
    pkill -f -- "--callgrind-out-file=$WORK/" 2>/dev/null || true
    as_user "$PGBIN/pg_ctl -D $WORK/pg -m immediate stop" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

as_user "$PGBIN/initdb -D $WORK/pg -A trust -U postgres" >"$WORK/initdb.log" 2>&1
as_user "$PGBIN/pg_ctl -D $WORK/pg -l $WORK/pg.log -w -o '-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1' start" >/dev/null
export PGSSLMODE=disable
psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" -c "CREATE DATABASE bench OWNER bench"
pgbench -q -i -s 2 -h 127.0.0.1 -p "$PGPORT" -U bench bench >/dev/null 2>&1
echo "postgresql://bench:bench@127.0.0.1:$PGPORT/bench" >"$WORK/dsn"
chmod 644 "$WORK/dsn"

# measure NAME PORT OUT: warm-up, zero, measured run, dump of the callgrind process writing
# OUT; prints instructions per transaction.
measure() {
    local name=$1 port=$2 out=$3 pid
    for _ in $(seq 150); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.2; done
    pid=$(pgrep -f -- "^[^ ]*valgrind[^ ]* .*--callgrind-out-file=$out " | head -1)
    pgbench -n -S -c $CLIENTS -j 2 -t 300 -h 127.0.0.1 -p "$port" -U bench bench >/dev/null
    as_user "callgrind_control -z $pid >/dev/null 2>&1"
    pgbench -n -S -c $CLIENTS -j 2 -t "$N" -h 127.0.0.1 -p "$port" -U bench bench >"$WORK/pgbench.log" 2>&1 ||
        { cat "$WORK/pgbench.log" >&2; exit 1; }
    as_user "callgrind_control -d $pid >/dev/null 2>&1"
    sleep 0.5
    kill "$pid"
    wait "$PROXY_PID" 2>/dev/null || true
    local dump total
    dump=$(ls "$out".* | sort | tail -1)
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$dump" "$KEEP/$(basename "$out")"; fi
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    printf '| %s | %d |\n' "$name" $((total / (CLIENTS * N)))
}

echo "| target | user-space instructions per select-only transaction |"
echo "| --- | ---: |"
TARGETS=${TARGETS:-dbproxy-session dbproxy-transaction pgbouncer-session pgbouncer-transaction}
wanted() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for mode in session transaction; do
    wanted "dbproxy-$mode" || continue
    port=$(free_port)
    as_user "exec valgrind --tool=callgrind --callgrind-out-file=$WORK/dbproxy-$mode.out $DBPROXY_BIN run --dbc $WORK/dsn --addr 127.0.0.1:$port --ops-addr 127.0.0.1:$(free_port) --pool-mode $mode --pool-size 8 ${DBPROXY_ARGS:-}" >"$WORK/dbproxy-$mode.log" 2>&1 &
    PROXY_PID=$!
    measure "dbproxy ($mode)" "$port" "$WORK/dbproxy-$mode.out"
done
if command -v pgbouncer >/dev/null; then
    for mode in session transaction; do
        wanted "pgbouncer-$mode" || continue
        port=$(free_port)
        cat >"$WORK/pgbouncer-$mode.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PGPORT dbname=bench user=bench password=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $WORK/users.txt
pool_mode = $mode
default_pool_size = 8
max_client_conn = 100
logfile = $WORK/pgbouncer-$mode.log
EOF
        echo '"bench" ""' >"$WORK/users.txt"
        chmod 644 "$WORK/users.txt" "$WORK/pgbouncer-$mode.ini"
        as_user "exec valgrind --tool=callgrind --callgrind-out-file=$WORK/pgbouncer-$mode.out pgbouncer $WORK/pgbouncer-$mode.ini" >/dev/null 2>&1 &
        PROXY_PID=$!
        measure "pgbouncer ($mode)" "$port" "$WORK/pgbouncer-$mode.out"
    done
else
    echo "(pgbouncer is not installed: apt-get install -y pgbouncer to compare)"
fi
PROXY_PID=
