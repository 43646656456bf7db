#!/usr/bin/env bash
# How often the daemon syncs, and how much it writes, at the rates of a typical site: the
# figures of docs/raspberry-pi.md's "SD-card wear". Each scenario publishes at a fixed rate
# for SECS seconds (wsbench), then reads waystation_store_commits_total (one fdatasync each)
# from /metrics and write_bytes from /proc/<pid>/io (what reached the block layer).
#
# Usage: scripts/sd-wear.sh [WAYSTATION [WSBENCH]]   (default: target/release/{waystation,wsbench})
# SECS=30 by default. Needs /usr/sbin/mosquitto (the bridge's upstream). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${1:-target/release/waystation}
WSB=${2:-target/release/wsbench}
SECS=${SECS:-30}
for b in "$WS" "$WSB" /usr/sbin/mosquitto; do [ -x "$b" ] || { echo "needs $b" >&2; exit 1; }; done
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { python3 -c 'import sys,urllib.request
t=urllib.request.urlopen("http://"+sys.argv[1]+"/metrics",timeout=10).read().decode()
print(sum(float(l.split()[-1]) for l in t.splitlines() if l.startswith(sys.argv[2]+" ") or l.startswith(sys.argv[2]+"{")))' "$1" "$2"; }

up=$(port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n' "$up" > "$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" 2> "$work/mosquitto.log" &
pids+=($!)

# scenario NAME PUBLISHERS RATE QOS BRIDGE(live|down|none) SUBSCRIBERS
scenario() {
  local name=$1 pubs=$2 rate=$3 qos=$4 bridge=$5 subs=$6 d="$work/$1" p h
  mkdir -p "$d"; p=$(port); h=$(port)
  printf '[gateway]\ndata_dir = "%s"\n[[listener]]\nbind = "127.0.0.1:%s"\n[http]\nbind = "127.0.0.1:%s"\n' "$d/data" "$p" "$h" > "$d/w.toml"
  case "$bridge" in
    live) printf '[[bridge]]\nname = "cloud"\naddress = "127.0.0.1:%s"\n[[bridge.forward]]\nlocal = "sensors/#"\nqos = 1\n' "$up" >> "$d/w.toml" ;;
    down) printf '[[bridge]]\nname = "cloud"\naddress = "127.0.0.1:%s"\n[[bridge.forward]]\nlocal = "sensors/#"\nqos = 1\n' "$(port)" >> "$d/w.toml" ;;
  esac
  "$WS" run --config "$d/w.toml" 2> "$d/log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 200); do grep -qs "listening on" "$d/log" && break; sleep 0.05; done
  local c0 w0 c1 w1 extra=()
  [ "$subs" = 0 ] || extra=(--sub-persistent)
  c0=$(metric "127.0.0.1:$h" waystation_store_commits_total)
  w0=$(awk '/^write_bytes/{print $2}' "/proc/$pid/io")
  "$WSB" run --addr "127.0.0.1:$p" --publishers "$pubs" --rate "$rate" --duration "$SECS" --qos "$qos" \
    --subscribers "$subs" "${extra[@]}" --idle-timeout 2 --scenario "$name" --broker waystation > "$d/bench.out" 2>&1 ||
    echo "$name: wsbench failed ($(tail -1 "$d/bench.out"))" >&2
  sleep 1
  c1=$(metric "127.0.0.1:$h" waystation_store_commits_total)
  w1=$(awk '/^write_bytes/{print $2}' "/proc/$pid/io")
  kill -TERM "$pid"; wait "$pid" || true
  python3 -c 'import sys
name,pubs,rate,secs,c,w=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4]),float(sys.argv[5]),float(sys.argv[6])
msgs=pubs*rate*secs
print(f"| {name} | {pubs*rate:.0f} | {c/secs:.0f} | {c/msgs:.2f} | {w/secs/1024:.0f} KiB/s | {w/secs*86400/1e9:.1f} GB |")' \
    "$name" "$pubs" "$rate" "$SECS" "$(echo "$c1 - $c0" | bc)" "$((w1 - w0))"
}

echo "| scenario | msg/s | syncs/s | syncs per message | written | per day |"
echo "|---|---|---|---|---|---|"
scenario "QoS 1, 50 sensors at 1/s, bridge up" 50 1 1 live 0
scenario "QoS 1, 50 sensors at 1/s, bridge down (backlog)" 50 1 1 down 0
scenario "QoS 0, 50 sensors at 1/s, bridge up" 50 1 0 live 0
scenario "QoS 1, 50 sensors at 1/s, one local persistent subscriber, no bridge" 50 1 1 none 1
scenario "QoS 1, 10 sensors at 20/s, bridge up" 10 20 1 live 0
