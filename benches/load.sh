#!/usr/bin/env bash
# Whole-proxy load comparison on loopback: portcullis (RS256 verified per request,
# cached and uncached) vs nginx as a plain reverse proxy vs HAProxy `jwt_verify`,
# all in front of the same nginx upstream, driven by wrk, interleaved and repeated.
# Also: latency added vs a direct call, and portcullis RSS idle and with 10,000
# open keep-alive connections. Traffic goes to 127.0.0.1 only; every run is bounded.
#
#   benches/load.sh [DURATION_SECS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
ROUNDS=${2:-3}
CONNS=${CONNS:-64}
WORK=$(mktemp -d /tmp/portcullis-load.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; nginx -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; kill "$(cat "$WORK/haproxy.pid" 2>/dev/null)" "$(cat "$WORK/redis.pid" 2>/dev/null)" 2>/dev/null || true; sleep 0.5' EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need redis-server; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light haproxy redis-server >/dev/null
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

UP=18081; NGX=18082; HAP=18083; PC=18084; PCN=18085; ADM=18086; ADMN=18087; PCR=18088; ADMR=18089; REDIS=18090
FIX=$PWD/tests/fixtures
cargo build --release --quiet --bin portcullis --example mint
BIN=target/release/portcullis
ISS=https://id.example.com
target/release/examples/mint 1 $ISS 86400 > "$WORK/token"
target/release/examples/mint 1000 $ISS 86400 > "$WORK/tokens"
TOKEN=$(cat "$WORK/token")

cat > "$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 8000; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$UP; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"

cat > "$WORK/haproxy.cfg" <<HAPROXY
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$HAP
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny unless { var(txn.alg) -m str RS256 }
  http-request deny unless { var(txn.bearer),jwt_verify(txn.alg,"$FIX/rsa1.pub.pem") -m int 1 }
  default_backend be
backend be
  http-reuse always
  server up 127.0.0.1:$UP
HAPROXY
haproxy -f "$WORK/haproxy.cfg" -D -p "$WORK/haproxy.pid"

pc_config() { # $1 port, $2 admin port, $3 token_cache_entries
cat <<TOML
[listen]
http = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
[limits]
max_connections = 20000
token_cache_entries = $3
[[issuers]]
name = "main"
issuer = "$ISS"
public_key_files = ["$FIX/rsa1.pub.pem"]
algorithms = ["RS256"]
[[routes]]
name = "api"
upstream = "http://127.0.0.1:$UP"
issuer = "main"
audiences = ["orders-api"]
scopes = ["orders:read"]
TOML
}
pc_config $PC $ADM 100000 > "$WORK/pc.toml"
pc_config $PCN $ADMN 0 > "$WORK/pc-nocache.toml"
{ pc_config $PCR $ADMR 100000; printf '[state]\nredis_url = "redis://127.0.0.1:%s/0"\n' $REDIS; } > "$WORK/pc-redis.toml"
redis-server --port $REDIS --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
PORTCULLIS_LOG=warn $BIN run --config "$WORK/pc.toml" 2>"$WORK/pc.log" & PC_PID=$!
PORTCULLIS_LOG=warn $BIN run --config "$WORK/pc-nocache.toml" 2>"$WORK/pcn.log" & PCN_PID=$!
PORTCULLIS_LOG=warn $BIN run --config "$WORK/pc-redis.toml" 2>"$WORK/pcr.log" &
for p in $ADM $ADMN $ADMR; do
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$p/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
done
sleep 1
rss() { awk '/VmRSS/ {printf "%.1f MB", $2/1024}' "/proc/$1/status"; }
IDLE_RSS=$(rss $PC_PID)

cat > "$WORK/many.lua" <<LUA
local tokens = {}
for line in io.lines("$WORK/tokens") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. tokens[i] })
end
LUA
cat > "$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.0f %.0f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
cat "$WORK/report.lua" >> "$WORK/many.lua"

run() { # name, url, extra args...
  local name=$1 url=$2; shift 2
  local out
  local threads=2; [ "$CONNS" -lt 2 ] && threads=1
  out=$(wrk -t$threads -c"$CONNS" -d"${DUR}s" "$@" -s "$WORK/report.lua" "$url" 2>&1 | grep RESULT || true)
  echo "$name $out" >> "$WORK/results"
}
runmany() {
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${DUR}s" -s "$WORK/many.lua" "$1" 2>&1 | grep RESULT || true)
  echo "$2 $out" >> "$WORK/results"
}
: > "$WORK/results"
for r in $(seq "$ROUNDS"); do
  run direct "http://127.0.0.1:$UP/"
  run nginx "http://127.0.0.1:$NGX/"
  run haproxy_jwt "http://127.0.0.1:$HAP/" -H "Authorization: Bearer $TOKEN"
  run portcullis "http://127.0.0.1:$PC/" -H "Authorization: Bearer $TOKEN"
  run portcullis_nocache "http://127.0.0.1:$PCN/" -H "Authorization: Bearer $TOKEN"
  run portcullis_redis "http://127.0.0.1:$PCR/" -H "Authorization: Bearer $TOKEN"
  runmany "http://127.0.0.1:$PC/" portcullis_1000_tokens
  runmany "http://127.0.0.1:$PCN/" portcullis_nocache_1000_tokens
done
# Latency added at low load: one connection, direct vs through portcullis.
CONNS=1; : > "$WORK/lat"
for r in $(seq "$ROUNDS"); do
  run lat_direct "http://127.0.0.1:$UP/"
  run lat_portcullis "http://127.0.0.1:$PC/" -H "Authorization: Bearer $TOKEN"
done

# 10,000 open keep-alive connections, each having made one request.
python3 - "$PC" "$TOKEN" <<'PY' &
import asyncio, sys
port, token = int(sys.argv[1]), sys.argv[2]
async def one(held):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    await w.drain()
    await r.readuntil(b"ok\n")
    held.append(w)
async def main():
    held = []
    for i in range(0, 10000, 500):
        await asyncio.gather(*(one(held) for _ in range(500)))
    print(f"OPEN {len(held)}", flush=True)
    await asyncio.sleep(8)
asyncio.run(main())
PY
HOLD=$!
sleep 6
CONN_RSS=$(rss $PC_PID)
OPEN=$(curl -fsS "http://127.0.0.1:$ADM/metrics" | awk '/^portcullis_open_connections/ {print $2}')
wait $HOLD || true

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); wrk -t2 -c64 ${DUR}s x ${ROUNDS} rounds, interleaved"
python3 - "$WORK/results" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 6: continue
    name, _, rps, p50, p99, errs = parts[:6]
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), int(errs)))
med = {k: (st.median(r[0] for r in v), st.median(r[1] for r in v), st.median(r[2] for r in v), sum(r[3] for r in v)) for k, v in rows.items()}
print(f"{'target':32} {'req/s':>10} {'p50 µs':>9} {'p99 µs':>9} {'errors':>7}")
for k, (rps, p50, p99, e) in med.items():
    print(f"{k:32} {rps:10.0f} {p50:9.0f} {p99:9.0f} {e:7d}")
def ratio(a, b):
    if a in med and b in med and med[b][0] > 0: print(f"{a} / {b}: {med[a][0] / med[b][0]:.2f}x")
ratio("portcullis", "nginx"); ratio("portcullis", "haproxy_jwt"); ratio("portcullis_nocache", "nginx"); ratio("portcullis_nocache", "haproxy_jwt"); ratio("portcullis_redis", "portcullis")
if "lat_direct" in med and "lat_portcullis" in med:
    print(f"added latency at p50 (1 connection): {med['lat_portcullis'][1] - med['lat_direct'][1]:.0f} µs")
PY
echo "portcullis RSS idle: $IDLE_RSS; with $OPEN open connections: $CONN_RSS"
