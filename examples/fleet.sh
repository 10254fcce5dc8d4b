#!/usr/bin/env bash
# Two portcullis instances sharing one Redis on one machine, in front of one
# upstream, as a load balancer would see them. Everything on 127.0.0.1.
#   examples/fleet.sh            # then: curl localhost:8081/ and localhost:8082/
# Stop with Ctrl-C (both instances and Redis are stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "install Redis first: apt-get install redis-server" >&2; exit 1; }
cargo build --release --quiet --bin portcullis
DIR=$(mktemp -d /tmp/portcullis-fleet.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; redis-cli -p 6390 shutdown nosave >/dev/null 2>&1 || true' EXIT

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null
export PORTCULLIS_COOKIE_KEY=${PORTCULLIS_COOKIE_KEY:-$(target/release/portcullis keygen)}   # the same key on every instance

for n in 1 2; do
  cat > "$DIR/instance$n.toml" <<TOML
[listen]
http = "127.0.0.1:808$n"
admin = "127.0.0.1:990$n"

[state]
redis_url = "redis://127.0.0.1:6390/0"
key_prefix = "demo:"

[[routes]]
name = "api"
upstream = "http://127.0.0.1:9001"
auth = "none"
TOML
  target/release/portcullis run --config "$DIR/instance$n.toml" 2>"$DIR/instance$n.log" &
done
sleep 1
echo "instances: http://127.0.0.1:8081 and :8082 (admin :9901 and :9902); logs in $DIR"
echo "try: curl -X POST localhost:9901/revocations -d '{\"sub\":\"alice\",\"issued_before\":$(date +%s)}'; curl localhost:9902/revocations"
wait
