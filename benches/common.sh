# Shared by the load benchmarks (sourced, not run): placement, CPU accounting,
# the upstream and starting portcullis. Expects WORK to be set.

GEN="taskset -c 0"   # the load generator
SUT="taskset -c 1"   # the upstream and the proxy under test

tree() { # a pid and its descendants
  local p=$1; echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null); do tree "$c"; done
}

ticks() { # user+system clock ticks of a process tree
  local sum=0
  for p in $(tree "$1"); do
    [ -r "/proc/$p/stat" ] || continue
    sum=$((sum + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo $sum
}

upstream_nginx() { # $1 port, $2 worker_connections[, $3 HTTP/2 (prior knowledge) port]: nginx answering `ok`, one worker on core 1
  local h2=""
  [ -n "${3:-}" ] && h2="server { listen 127.0.0.1:$3 http2 backlog=4096; keepalive_requests 1000000; location / { return 200 \"ok\\n\"; } }"
  cat > "$WORK/nginx-up.conf" <<NGINX
worker_processes 1; worker_cpu_affinity 10;
pid $WORK/nginx-up.pid; error_log $WORK/nginx-up.log;
events { worker_connections $2; }
http { access_log off; server { listen 127.0.0.1:$1 backlog=4096; location / { return 200 "ok\n"; } } $h2 }
NGINX
  nginx -c "$WORK/nginx-up.conf"
}

start_pc() { # $1 config, $2 log level, $3 admin port[, $4 binary]; starts portcullis on core 1, waits for /readyz, prints the pid
  PORTCULLIS_LOG=$2 $SUT "${4:-$BIN}" run --config "$1" 2>>"$WORK/pc-$3.log" >/dev/null &
  local pid=$!
  echo $pid >> "$WORK/pids"
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  echo $pid
}
