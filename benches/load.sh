#!/usr/bin/env bash
# Whole-proxy cost on loopback, side by side in one run: portcullis against
# nginx as a plain reverse proxy and HAProxy 2.6 `jwt_verify`, all in front of
# the same nginx upstream answering `ok`.
#
# Placement: the load generator (wrk, h2load) on core 0; the upstream and the
# proxy under test on core 1, one worker each. The figure to trust is CPU per
# request: the proxy's own user+system time (/proc/PID/stat, whole process
# tree) over the requests it answered. Throughput swings with neighbours.
#
# Also: added latency with one connection, TLS with HTTP/1.1 and HTTP/2 (h2load
# against nginx `ssl http2`), the access log at info vs warn, `[tracing]` at
# sample_ratio 1.0 and 0.01 (spans POSTed to the upstream nginx, which answers
# 200 like a collector; its CPU is not counted), one `sub` rate limit plus 20
# rules (the last one deciding, on a claim), upstream_protocol = "h2" (to the
# upstream nginx's HTTP/2 port), an opaque token whose introspection answer is
# cached (from a second nginx standing in for the endpoint), 1 vs 2 workers
# unpinned, and portcullis' RSS idle and with 10,000 keep-alive connections.
# `hyper_floor` (examples/hyper_floor.rs) is the HTTP stack alone: hyper's
# server and client connections forwarding as portcullis does, with nothing
# else; what portcullis costs above it is its own work.
# Traffic goes to 127.0.0.1 only; every run is bounded in time.
#
#   benches/load.sh [DURATION_SECS] [ROUNDS]
#   ONLY="portcullis nginx" benches/load.sh 5 1   # a subset of targets (names as printed; "workers", "rss")
#   BASELINE_BIN=/path/to/other/portcullis benches/load.sh   # also "portcullis_baseline": that build, same config, interleaved
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
ROUNDS=${2:-2}
WORK=$(mktemp -d /tmp/portcullis-load.XXXXXX)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  [ -f "$WORK/pids" ] && kill $(cat "$WORK/pids") 2>/dev/null || true
  for c in "$WORK"/nginx-*.conf; do nginx -c "$c" -s stop 2>/dev/null || true; done
  [ -f "$WORK/haproxy.pid" ] && kill "$(cat "$WORK/haproxy.pid")" 2>/dev/null || true
  sleep 0.5
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need h2load || ! need openssl || ! need taskset; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light haproxy nghttp2-client openssl util-linux >/dev/null
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (load generator on one, upstream + proxy on the other)" >&2; exit 1; }
. benches/common.sh
TICK=$(getconf CLK_TCK)

UP=18081; NGX=18082; NGXS=18083; HAP=18084; PC=18085; PCN=18086; PCL=18087; PCS=18088
ADM=18091; ADMN=18092; ADML=18093; ADMS=18094
PCT=18089; PCT2=18090; ADMT=18095; ADMT2=18096
PCR=18097; ADMR=18098   # one rate limit and 20 rules on the route
PCH=18099; ADMH=18100; UPH2=18101   # upstream_protocol = "h2" to the upstream's HTTP/2 port
PCB=18102; ADMB=18103   # BASELINE_BIN
PCI=18104; ADMI=18105; INTRO=18106   # an opaque token, cached after one RFC 7662 introspection
FLR=18107   # examples/hyper_floor
FIX=$PWD/tests/fixtures
cargo build --release --quiet --bin portcullis --example mint --example hyper_floor
BIN=$PWD/target/release/portcullis
ISS=https://id.example.com
target/release/examples/mint 1 $ISS 86400 > "$WORK/token"
target/release/examples/mint 1000 $ISS 86400 > "$WORK/tokens"
TOKEN=$(cat "$WORK/token")
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# nginx as the plain reverse proxy (HTTP and TLS with HTTP/2), one worker on core 1.
cat > "$WORK/nginx-proxy.conf" <<NGINX
worker_processes 1; worker_cpu_affinity 10;
pid $WORK/nginx-proxy.pid; error_log $WORK/nginx-proxy.log;
events { worker_connections 20000; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$NGX backlog=4096;
    listen 127.0.0.1:$NGXS ssl http2 backlog=4096;
    ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;
    keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
upstream_nginx $UP 20000 $UPH2
nginx -c "$WORK/nginx-proxy.conf"

cat > "$WORK/haproxy.cfg" <<HAPROXY
global
  nbthread 1
  cpu-map 1/1 1
  maxconn 9000
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

# The introspection endpoint: nginx answering one active token's claims (called
# once; the answer is cached for an hour). Its CPU is not counted.
cat > "$WORK/nginx-introspect.conf" <<NGINX
worker_processes 1; worker_cpu_affinity 01;
pid $WORK/nginx-introspect.pid; error_log $WORK/nginx-introspect.log;
events { worker_connections 64; }
http { access_log off; server { listen 127.0.0.1:$INTRO; default_type application/json;
  location / { return 200 '{"active":true,"sub":"user-0","scope":"orders:read","aud":"orders-api","exp":4102444800}'; } } }
NGINX
nginx -c "$WORK/nginx-introspect.conf"

pc_config() { # $1 http port, $2 admin port, $3 token_cache_entries, $4 https port (optional), $5 sample_ratio (optional)
  printf '[listen]\nhttp = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\n' "$1" "$2"
  [ -n "${4:-}" ] && printf 'https = "127.0.0.1:%s"\n[tls]\ncert = "%s"\nkey = "%s"\n' "$4" "$WORK/cert.pem" "$WORK/key.pem"
  [ -n "${5:-}" ] && printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' "$UP" "$5"
  cat <<TOML
[limits]
max_connections = 20000
token_cache_entries = $3
header_read_timeout = "60s"   # idle keep-alive connections stay for the RSS measure
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
pc_config $PC $ADM 100000 "" > "$WORK/pc.toml"
pc_config $PCN $ADMN 0 "" > "$WORK/pc-nocache.toml"
pc_config $PCL $ADML 100000 "" > "$WORK/pc-log.toml"
pc_config $PCS $ADMS 100000 $((PCS + 100)) > "$WORK/pc-tls.toml"
pc_config $PCT $ADMT 100000 "" 1.0 > "$WORK/pc-trace.toml"
pc_config $PCT2 $ADMT2 100000 "" 0.01 > "$WORK/pc-trace-0.01.toml"
{
  pc_config $PCR $ADMR 100000 ""
  for n in $(seq 19); do printf '[[routes.rules]]\npath_prefix = "/section%s"\ndeny = true\n' "$n"; done
  printf '[[routes.rules]]\npath_prefix = "/"\nclaims = { sub = "user-0" }\n'
  printf '[[rate_limits]]\nname = "per-user"\nkey = "sub"\nrate = "1000000/s"\n'
} > "$WORK/pc-limits.toml"
pc_config $PCI $ADMI 100000 "" | sed "s|^issuer = \"main\"$|issuer = \"legacy\"|" > "$WORK/pc-introspect.toml"
printf '[[issuers]]\nname = "legacy"\nissuer = "https://legacy.example.com"\nintrospection = { url = "http://127.0.0.1:%s/introspect", client_id = "edge", client_auth = "none", cache = "1h" }\n' "$INTRO" >> "$WORK/pc-introspect.toml"
pc_config $PCH $ADMH 100000 "" | sed "s|^upstream = .*|upstream = \"http://127.0.0.1:$UPH2\"\nupstream_protocol = \"h2\"|" > "$WORK/pc-h2up.toml"
PCS_TLS=$((PCS + 100))
PC_PID=$(start_pc "$WORK/pc.toml" warn $ADM)
PCN_PID=$(start_pc "$WORK/pc-nocache.toml" warn $ADMN)
PCL_PID=$(start_pc "$WORK/pc-log.toml" info $ADML)
PCS_PID=$(start_pc "$WORK/pc-tls.toml" warn $ADMS)
PCT_PID=$(start_pc "$WORK/pc-trace.toml" warn $ADMT)
PCT2_PID=$(start_pc "$WORK/pc-trace-0.01.toml" warn $ADMT2)
PCR_PID=$(start_pc "$WORK/pc-limits.toml" warn $ADMR)
PCH_PID=$(start_pc "$WORK/pc-h2up.toml" warn $ADMH)
PCI_PID=$(start_pc "$WORK/pc-introspect.toml" warn $ADMI)
if [ -n "${BASELINE_BIN:-}" ]; then
  pc_config $PCB $ADMB 100000 "" > "$WORK/pc-baseline.toml"
  PCB_PID=$(start_pc "$WORK/pc-baseline.toml" warn $ADMB "$BASELINE_BIN")
fi
$SUT target/release/examples/hyper_floor 127.0.0.1:$FLR 127.0.0.1:$UP &
FLR_PID=$!
echo $FLR_PID >> "$WORK/pids"
sleep 1
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
IDLE_RSS=$(rss "$PC_PID")

NGX_PID=$(cat "$WORK/nginx-proxy.pid"); HAP_PID=$(cat "$WORK/haproxy.pid"); UP_PID=$(cat "$WORK/nginx-up.pid")

cat > "$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.0f %.0f %.0f %d\n", summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
cat > "$WORK/many.lua" <<LUA
local tokens = {}
for line in io.lines("$WORK/tokens") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/", { ["Authorization"] = "Bearer " .. tokens[i] })
end
LUA
cat "$WORK/report.lua" >> "$WORK/many.lua"

: > "$WORK/results"
# name, pid whose CPU counts, connections, then wrk arguments
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
wrk_run() {
  local name=$1 pid=$2 conns=$3; shift 3
  want "$name" || return 0
  local before after out
  before=$(ticks "$pid")
  out=$($GEN wrk -t1 -c"$conns" -d"${DUR}s" "$@" 2>&1 | grep RESULT || echo "RESULT 0 0 0 0 1")
  after=$(ticks "$pid")
  echo "$name $((after - before)) $out" >> "$WORK/results"
}
# name, pid, then h2load arguments (h2load reports its own totals)
h2_run() {
  local name=$1 pid=$2; shift 2
  want "$name" || return 0
  local before after out n p50 rps errs
  before=$(ticks "$pid")
  out=$($GEN h2load -D "$DUR" "$@" 2>&1)
  after=$(ticks "$pid")
  n=$(awk '/^requests:/ {print $8}' <<<"$out"); errs=$(awk '/^requests:/ {print $10 + $12}' <<<"$out")
  rps=$(awk '/^finished in/ {print $4}' <<<"$out"); p50=$(awk '/^time for request:/ {v=$5; if (v ~ /ms$/) {sub(/ms/,"",v); v*=1000} else if (v ~ /us$/) {sub(/us/,"",v)} else {sub(/s$/,"",v); v*=1e6}; print v}' <<<"$out")
  echo "$name $((after - before)) RESULT ${n:-0} ${rps:-0} ${p50:-0} 0 ${errs:-1}" >> "$WORK/results"
}
AUTH=(-H "Authorization: Bearer $TOKEN")
for r in $(seq "$ROUNDS"); do
  wrk_run direct "$UP_PID" 64 -s "$WORK/report.lua" "http://127.0.0.1:$UP/"
  wrk_run nginx "$NGX_PID" 64 -s "$WORK/report.lua" "http://127.0.0.1:$NGX/"
  wrk_run haproxy_jwt "$HAP_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$HAP/"
  wrk_run portcullis "$PC_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PC/"
  wrk_run hyper_floor "$FLR_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$FLR/"
  [ -n "${PCB_PID:-}" ] && wrk_run portcullis_baseline "$PCB_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCB/"
  wrk_run portcullis_1000_tokens "$PC_PID" 64 -s "$WORK/many.lua" "http://127.0.0.1:$PC/"
  wrk_run portcullis_nocache "$PCN_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCN/"
  wrk_run portcullis_nocache_1000_tokens "$PCN_PID" 64 -s "$WORK/many.lua" "http://127.0.0.1:$PCN/"
  wrk_run portcullis_access_log "$PCL_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCL/"
  wrk_run portcullis_trace_1.0 "$PCT_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCT/"
  wrk_run portcullis_trace_0.01 "$PCT2_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCT2/"
  wrk_run portcullis_limit_rules "$PCR_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCR/"
  wrk_run portcullis_h2_upstream "$PCH_PID" 64 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PCH/"
  wrk_run portcullis_introspected "$PCI_PID" 64 -H "Authorization: Bearer opaque-bench-token-0001" -s "$WORK/report.lua" "http://127.0.0.1:$PCI/"
  h2_run nginx_tls_h1 "$NGX_PID" --h1 -c64 "https://127.0.0.1:$NGXS/"
  h2_run portcullis_tls_h1 "$PCS_PID" --h1 -c64 "${AUTH[@]}" "https://127.0.0.1:$PCS_TLS/"
  h2_run nginx_tls_h2 "$NGX_PID" -c32 -m8 "https://127.0.0.1:$NGXS/"
  h2_run portcullis_tls_h2 "$PCS_PID" -c32 -m8 "${AUTH[@]}" "https://127.0.0.1:$PCS_TLS/"
  wrk_run lat_direct "$UP_PID" 1 -s "$WORK/report.lua" "http://127.0.0.1:$UP/"
  wrk_run lat_nginx "$NGX_PID" 1 -s "$WORK/report.lua" "http://127.0.0.1:$NGX/"
  wrk_run lat_portcullis "$PC_PID" 1 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PC/"
  wrk_run lat_hyper_floor "$FLR_PID" 1 "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$FLR/"
done

# 1 vs 2 workers, unpinned: portcullis free on both cores, wrk beside it.
if want workers || want rss; then
kill "$PC_PID" 2>/dev/null; wait "$PC_PID" 2>/dev/null || true
for workers in 1 2; do
  PORTCULLIS_WORKERS=$workers PORTCULLIS_LOG=warn "$BIN" run --config "$WORK/pc.toml" 2>>"$WORK/pc-w$workers.log" >/dev/null &
  PC_PID=$!
  echo $PC_PID >> "$WORK/pids"
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$ADM/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  for r in $(seq "$ROUNDS"); do
    want workers || break
    before=$(ticks "$PC_PID")
    out=$(wrk -t2 -c64 -d"${DUR}s" "${AUTH[@]}" -s "$WORK/report.lua" "http://127.0.0.1:$PC/" 2>&1 | grep RESULT || echo "RESULT 0 0 0 0 1")
    echo "unpinned_${workers}_worker $(( $(ticks "$PC_PID") - before )) $out" >> "$WORK/results"
  done
  [ "$workers" = 2 ] || { kill "$PC_PID"; wait "$PC_PID" 2>/dev/null || true; }
done
fi

# 10,000 open keep-alive connections, each having made one request.
CONN_RSS="- MB"; OPEN=0
if want rss; then
$GEN python3 - "$PC" "$TOKEN" <<'PY' &
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
    await asyncio.sleep(90)
asyncio.run(main())
PY
HOLD=$!
for _ in $(seq 100); do
  OPEN=$(curl -fsS "http://127.0.0.1:$ADM/metrics" | awk '/^portcullis_open_connections/ {print $2}')
  [ "${OPEN:-0}" -ge 10000 ] && break; sleep 0.2
done
# Idle connections give their buffers back after 2 s; jemalloc returns the
# pages within its 10 s decay. Sample each second until two samples 5 s apart
# agree within 1 % (at most 45 s); the peak is what the opening burst took.
PEAK_RSS=0; samples=()
for i in $(seq 45); do
  sleep 1
  now=$(rss "$PC_PID"); samples+=("$now")
  PEAK_RSS=$(awk -v a="$PEAK_RSS" -v b="$now" 'BEGIN {print (b > a) ? b : a}')
  CONN_RSS=$now
  [ "$i" -ge 12 ] && awk -v a="${samples[$((i - 6))]}" -v b="$now" 'BEGIN {exit !(a - b <= a * 0.01 && b - a <= a * 0.01)}' && break
done
CONN_RSS="$CONN_RSS MB settled (peak $PEAK_RSS MB)"
kill "$HOLD" 2>/dev/null; wait "$HOLD" 2>/dev/null || true
fi

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "placement: load generator on core 0; upstream + proxy on core 1, one worker each; ${DUR}s x ${ROUNDS} rounds, interleaved; medians"
drops() { curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | awk '/^portcullis_trace_export_errors_total/ {print $2}'; }
DROPS="portcullis_trace_1.0=$(drops $ADMT) portcullis_trace_0.01=$(drops $ADMT2)"
python3 - "$WORK/results" "$TICK" "$IDLE_RSS" "$CONN_RSS" "${OPEN:-0}" "$DROPS" <<'PY'
import sys, statistics as st
path, tick, idle, conn, opened = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
drops = dict(kv.split("=", 1) for kv in sys.argv[6].split())
rows = {}
for line in open(path):
    p = line.split()
    if len(p) < 8: continue
    name, cpu, _, n, rps, p50, p99, errs = p[:8]
    n = int(n)
    us = (int(cpu) / tick * 1e6 / n) if n else float("nan")
    rows.setdefault(name, []).append((us, float(rps), float(p50), float(p99), int(errs)))
med = {k: tuple(st.median(r[i] for r in v) for i in range(4)) + (sum(r[4] for r in v),) for k, v in rows.items()}
print(f"{'target':40} {'CPU µs/req':>10} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'errors':>7}")
for k, (us, rps, p50, p99, e) in med.items():
    print(f"{k:40} {us:10.1f} {rps:9.0f} {p50:8.0f} {p99:8.0f} {e:7d}")
def ratio(label, a, b, target=None):
    if a in med and b in med:
        r = med[a][0] / med[b][0]
        met = "" if target is None else ("  met" if r <= target else f"  MISSED (target <= {target}x)")
        print(f"CPU/req {label}: {r:.2f}x{met}")
ratio("portcullis / nginx", "portcullis", "nginx", 0.8)
if "portcullis" in med and "nginx" in med:
    t = med["portcullis"][1] / med["nginx"][1]
    print(f"req/s portcullis / nginx: {t:.2f}x" + ("  met" if t >= 1 else "  MISSED (target >= 1x)"))
ratio("hyper_floor (the HTTP stack alone) / nginx", "hyper_floor", "nginx")
ratio("portcullis / hyper_floor", "portcullis", "hyper_floor")
ratio("portcullis 1000 tokens / nginx", "portcullis_1000_tokens", "nginx")
ratio("portcullis cache off / haproxy jwt_verify", "portcullis_nocache", "haproxy_jwt", 0.67)
if "portcullis_nocache" in med and "haproxy_jwt" in med:
    print(f"req/s portcullis cache off / haproxy: {med['portcullis_nocache'][1] / med['haproxy_jwt'][1]:.2f}x")
ratio("TLS HTTP/1.1 portcullis / nginx", "portcullis_tls_h1", "nginx_tls_h1", 1.0)
ratio("TLS HTTP/2 portcullis / nginx", "portcullis_tls_h2", "nginx_tls_h2", 0.75)
ratio("access log info / warn", "portcullis_access_log", "portcullis", 1.10)
ratio("tracing sample_ratio 1.0 / off", "portcullis_trace_1.0", "portcullis")
ratio("tracing sample_ratio 0.01 / off", "portcullis_trace_0.01", "portcullis")
ratio("rate limit + 20 rules / neither", "portcullis_limit_rules", "portcullis")
ratio("upstream_protocol h2 / http1", "portcullis_h2_upstream", "portcullis")
ratio("portcullis / BASELINE_BIN", "portcullis", "portcullis_baseline")
ratio("opaque token, cached introspection / JWT, cached", "portcullis_introspected", "portcullis")
ratio("upstream_protocol h2 portcullis / nginx", "portcullis_h2_upstream", "nginx", 0.8)
if all(k in med for k in ("lat_direct", "lat_nginx", "lat_portcullis")):
    d = med["lat_direct"][2]
    pn, pp = med["lat_nginx"][2] - d, med["lat_portcullis"][2] - d
    floor = f", hyper_floor {med['lat_hyper_floor'][2] - d:.0f} µs" if "lat_hyper_floor" in med else ""
    print(f"added p50 latency, one connection: nginx {pn:.0f} µs, portcullis {pp:.0f} µs{floor}" + ("  met" if pp <= pn else "  MISSED"))
for name in ("portcullis_trace_1.0", "portcullis_trace_0.01"):
    print(f"{name}: trace export errors {drops.get(name, '-')}")
print(f"portcullis RSS idle: {idle} MB; with {opened} open keep-alive connections: {conn}")
PY
