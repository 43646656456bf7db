#!/usr/bin/env bash
# Where Waystation's time goes under fan-in (issue 14): perf on the daemon while 8 publishers
# x MSGS x 64 B go to one subscriber on sensors/# (QoS 0 or 1), configured as bench.sh does
# (durable acks: a bridge forwards sensors/# to a closed port, so every message is written).
#
#   scripts/profile.sh 0|1 [MSGS]     # needs perf (Debian: linux-perf) and release binaries
#
# Prints the top symbols (self time) and the top call paths (dwarf unwinding). perf data and
# reports: $PROF_OUT (default target/profile/<date>-qosN/).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QOS=${1:?usage: profile.sh 0|1 [MSGS]}; MSGS=${2:-100000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WS=$CARGO_TARGET_DIR/release/waystation; WSB=$CARGO_TARGET_DIR/release/wsbench
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
OUT=${PROF_OUT:-$ROOT/target/profile/$(date -u +%Y%m%dT%H%M%SZ)-qos$QOS}
mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(port); UP=$(port)
cat > "$OUT/waystation.toml" <<CONF
[gateway]
data_dir = "$OUT/data"
[[listener]]
bind = "127.0.0.1:$P"
[limits]
max_queued_messages = 100000000
max_queued_bytes = 17179869184
max_connection_rate = 0
[storage]
max_bytes = 4294967296
[http]
bind = "127.0.0.1:0"
[[bridge]]
name = "cloud"
address = "127.0.0.1:$UP"
max_inflight = 300
[[bridge.forward]]
local = "sensors/#"
remote_prefix = ""
qos = 1
CONF
"$WS" run --config "$OUT/waystation.toml" 2> "$OUT/stderr.log" &
WPID=$!
trap 'kill $WPID 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 400); do grep -qs "listening on" "$OUT/stderr.log" && break; sleep 0.025; done
perf record -F 999 --call-graph dwarf,32768 -p "$WPID" -o "$OUT/perf.data" 2> "$OUT/perf-record.log" &
PERF=$!
sleep 0.5
"$WSB" run --addr "127.0.0.1:$P" --publishers 8 --messages "$MSGS" --qos "$QOS" --payload 64 --subscribers 1 \
  --pid "$WPID" --scenario "profile-qos$QOS" --broker waystation > "$OUT/run.json"
kill -INT "$PERF"; wait "$PERF" || true
perf report -i "$OUT/perf.data" --no-children --sort dso,symbol --stdio --percent-limit 1 -g none \
  > "$OUT/self.txt" 2>/dev/null
perf report -i "$OUT/perf.data" --children --sort symbol --stdio --percent-limit 5 -g caller,0.5,callee --max-stack 12 \
  > "$OUT/children.txt" 2>/dev/null
grep -v '^#' "$OUT/self.txt" | grep -v '^$' | head -30
echo "--- $OUT (self.txt, children.txt, perf.data)"
