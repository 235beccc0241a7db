#!/bin/sh
# The cost of each Redis durability profile (deploy/redis/*.conf), measured with
# redis-benchmark against a redis-server started with that file: plain writes (SET), stream
# appends (XADD, what every grant does) and one client at a time (the fsync latency itself).
#   loadtest/redis_profiles.sh [requests]
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-200000}
quiet() { "$@" 2>&1 | tr '\r' '\n' | grep 'requests per second' | sed "s/^ *//"; }
for profile in zero-loss throughput; do
    dir=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server "$here/deploy/redis/$profile.conf" --port "$port" --bind 127.0.0.1 \
        --dir "$dir" --logfile "$dir/redis.log" --daemonize yes --pidfile "$dir/redis.pid"
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
    echo "== $profile ($(redis-cli -p "$port" config get appendfsync | tail -1))"
    quiet redis-benchmark -p "$port" -q -n "$n" -c 64 -t set
    quiet redis-benchmark -p "$port" -q -n "$n" -c 64 xadd "fc:{c:bench}:events" '*' claim_id x seq 1
    echo "one client:"
    quiet redis-benchmark -p "$port" -q -n $((n / 20)) -c 1 -t set
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$dir"
done
