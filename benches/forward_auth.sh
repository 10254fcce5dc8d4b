#!/usr/bin/env bash
# Forward auth on loopback: portcullis' CPU per request when it answers nginx
# `auth_request` subrequests, against the same portcullis proxying the request
# itself, and nginx alone (no auth) in front of the same upstream.
#
# Placement: wrk on core 0; the nginx upstream (answers `ok`), the nginx front
# and portcullis on core 1, one worker each. CPU per request is user+system
# time from /proc/PID/stat (whole process tree) over the requests answered.
# Traffic goes to 127.0.0.1 only; every run is bounded in time.
#
#   benches/forward_auth.sh [DURATION_SECS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
ROUNDS=${2:-3}
WORK=$(mktemp -d /tmp/portcullis-fa.XXXXXX)
cleanup() {
  [ -f "$WORK/pids" ] && kill $(cat "$WORK/pids") 2>/dev/null || true
  for c in "$WORK"/nginx-*.conf; do nginx -c "$c" -s stop 2>/dev/null || true; done
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! need wrk || ! need nginx || ! need taskset; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx util-linux >/dev/null
fi
export PATH=$PATH:/usr/sbin
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (wrk on one, the rest on the other)" >&2; exit 1; }
. benches/common.sh
TICK=$(getconf CLK_TCK)

UP=18181; FRONT=18182; PLAIN=18183; PC=18184; FA=18185; ADM=18186
FIX=$PWD/tests/fixtures
ISS=https://id.example.com
cargo build --release --quiet --bin portcullis --example mint
BIN=$PWD/target/release/portcullis
TOKEN=$(target/release/examples/mint 1 $ISS 86400)

# The front: auth_request to portcullis on kept-alive connections (as an
# operator would configure it), and a plain reverse proxy for the baseline.
cat > "$WORK/nginx-front.conf" <<NGINX
worker_processes 1; worker_cpu_affinity 10;
pid $WORK/nginx-front.pid; error_log $WORK/nginx-front.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  upstream portcullis { server 127.0.0.1:$FA; keepalive 64; }
  server {
    listen 127.0.0.1:$FRONT backlog=4096;
    keepalive_requests 1000000;
    location / {
      auth_request /.portcullis/auth;
      auth_request_set \$subject \$upstream_http_x_auth_subject;
      proxy_set_header X-Auth-Subject \$subject;
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }
    location = /.portcullis/auth {
      internal;
      proxy_pass http://portcullis; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Original-Method \$request_method;
      proxy_set_header X-Original-URI \$request_uri;
    }
  }
  server {
    listen 127.0.0.1:$PLAIN backlog=4096;
    keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
upstream_nginx $UP 4096
nginx -c "$WORK/nginx-front.conf"

cat > "$WORK/pc.toml" <<TOML
[listen]
http = "127.0.0.1:$PC"
admin = "127.0.0.1:$ADM"
[forward_auth]
listen = "127.0.0.1:$FA"
[limits]
max_connections = 20000
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
PC_PID=$(start_pc "$WORK/pc.toml" warn $ADM)
AUTH=(-H "Authorization: Bearer $TOKEN")
for url in "http://127.0.0.1:$PC/" "http://127.0.0.1:$FRONT/"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$url")
  [ "$code" = 200 ] || { echo "$url answered $code, not 200" >&2; exit 1; }
done

NGX_PID=$(cat "$WORK/nginx-front.pid")
cat > "$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.0f %d\n", summary.requests, summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

: > "$WORK/results"
run() { # name, url; records portcullis' and the nginx front's CPU ticks
  local name=$1 url=$2 pc ngx out
  pc=$(ticks "$PC_PID"); ngx=$(ticks "$NGX_PID")
  out=$($GEN wrk -t1 -c64 -d"${DUR}s" "${AUTH[@]}" -s "$WORK/report.lua" "$url" 2>&1 | grep RESULT || echo "RESULT 0 0 1")
  echo "$name $(( $(ticks "$PC_PID") - pc )) $(( $(ticks "$NGX_PID") - ngx )) $out" >> "$WORK/results"
}
for _ in $(seq "$ROUNDS"); do
  run proxied "http://127.0.0.1:$PC/"
  run nginx_auth_request "http://127.0.0.1:$FRONT/"
  run nginx_alone "http://127.0.0.1:$PLAIN/"
done

echo "machine: $(nproc) cores, $(uname -r); wrk on core 0, the rest on core 1; ${DUR}s x ${ROUNDS} rounds, medians"
python3 - "$WORK/results" "$TICK" <<'PY'
import sys, statistics as st
path, tick = sys.argv[1], int(sys.argv[2])
rows = {}
for line in open(path):
    name, pc, ngx, _, n, rps, errs = line.split()
    n = int(n)
    per = lambda t: int(t) / tick * 1e6 / n if n else float("nan")
    rows.setdefault(name, []).append((per(pc), per(ngx), float(rps), int(errs)))
med = {k: (st.median(r[0] for r in v), st.median(r[1] for r in v), st.median(r[2] for r in v), sum(r[3] for r in v)) for k, v in rows.items()}
print(f"{'target':22} {'portcullis µs/req':>18} {'nginx front µs/req':>19} {'req/s':>8} {'errors':>7}")
for k, (pc, ngx, rps, e) in med.items():
    print(f"{k:22} {pc:18.1f} {ngx:19.1f} {rps:8.0f} {e:7d}")
if "proxied" in med and "nginx_auth_request" in med:
    r = med["nginx_auth_request"][0] / med["proxied"][0]
    print(f"portcullis CPU/req, subrequest / proxied: {r:.2f}x" + ("  (cheaper)" if r < 1 else "  (NOT cheaper)"))
PY
