#!/usr/bin/env bash
# Waystation beside Mosquitto 2.0 and rumqttd 0.20: every scenario of issue 6, interleaved over
# rounds, one table per scenario (median, min-max, ratio to Waystation). See docs/BENCHMARKS.md.
#
#   scripts/bench.sh                 # full run (1-6 fit in 10 minutes on the 2-core dev VM,
#                                    # 7 adds about 3, 8 and 9 under 1)
#   scripts/bench.sh --quick         # smaller counts, one round (about 3 minutes, 7 adds 1)
#   scripts/bench.sh --rounds 5      # more rounds for scenarios 1-3
#   scripts/bench.sh --only 1,4      # a subset of scenarios 1-12 (6: RSS against the backlog;
#                                    # S6_STEP=500000 S6_STEPS=8 for 4 M; 7: the uplink over a
#                                    # simulated WAN link, S7_INFLIGHT=N the bridges' window,
#                                    # S7_WIDE=N a wide-window Waystation drain, 0: none;
#                                    # 8: QoS 0 flood to a frozen upstream, peak RSS, S8_ROUNDS=N;
#                                    # 9: 1 MiB QoS 1 messages, MiB/s, S9_INFLIGHT=N the window;
#                                    # 10: open-loop QoS 1 latency at 25/50/90% of each
#                                    # broker's own saturation; 11: QoS 0 fan-in to a
#                                    # subscriber that keeps up on average, and to one that
#                                    # reads at a tenth of the publish rate; 12: issue 15's
#                                    # pipeline with firmware events: upstream bytes and
#                                    # PUBLISHes per event, Waystation plain/batch/zstd/gzip
#                                    # beside Mosquitto's bridge, and ingest with validate +
#                                    # dedup on vs off; about 2 minutes)
#   scripts/bench.sh --no-build      # use the binaries already in $CARGO_TARGET_DIR/release
#
# Needs /usr/sbin/mosquitto (Debian's mosquitto 2.0). Results: $BENCH_OUT (default
# target/bench/<date>/): results.jsonl (one JSON record per run), tables.md, broker logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MODE=full
ROUNDS=3
ONLY=1,2,3,4,5,6,7,8,9,10,11,12
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; ROUNDS=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$MODE" = full ]; then
  S1_MSGS=20000            # per publisher, 8 publishers
  S2_CLIENTS=1000; S2_SECS=10; S2_ROUNDS=2; IDLE_CLIENTS=10000; IDLE_BIG=${IDLE_BIG:-100000}
  S3_MSGS=20000; S3_RATE=250; S3_SECS=20; S3_DOWN_AT=5; S3_DOWN_FOR=10
  S4_TOTAL=1000000; S4_CEIL=200000; S4_ROUNDS=2
  S6_STEP=${S6_STEP:-250000}; S6_STEPS=${S6_STEPS:-8}
  S7_DRAIN=100000; S7_LAT_SECS=15; S7_SUB_MAX=120; S7_ROUNDS=${S7_ROUNDS:-2}
  S8_PER=250000            # per publisher, 8 publishers (issue 17)
  S9_MSGS=300              # 1 MiB each
  S10_SAT=50000; S10_SECS=10   # saturation: 8 x S10_SAT closed loop; then S10_SECS per load
  S11_SECS=10
else
  S1_MSGS=5000
  S2_CLIENTS=300; S2_SECS=5; S2_ROUNDS=1; IDLE_CLIENTS=2000; IDLE_BIG=${IDLE_BIG:-10000}
  S3_MSGS=5000; S3_RATE=250; S3_SECS=12; S3_DOWN_AT=3; S3_DOWN_FOR=5
  S4_TOTAL=100000; S4_CEIL=50000; S4_ROUNDS=1
  S6_STEP=${S6_STEP:-50000}; S6_STEPS=${S6_STEPS:-4}
  S7_DRAIN=20000; S7_LAT_SECS=5; S7_SUB_MAX=60; S7_ROUNDS=${S7_ROUNDS:-1}
  S8_PER=50000
  S9_MSGS=100
  S10_SAT=5000; S10_SECS=5
  S11_SECS=5
fi
# 8: flooders and rounds; 9: QoS 1 messages of 1 MiB unacknowledged at once (the publisher's
# window) and Waystation's max_packet_size (the largest it accepts: 16 MiB payload + topic).
S8_PUBS=8; S8_ROUNDS=${S8_ROUNDS:-1}
S9_PAYLOAD=1048576; S9_INFLIGHT=${S9_INFLIGHT:-10}; S9_MAX_PACKET=16842752
# 7: one-way delay of the simulated link for the drain and for the latency runs; the window
# (unacknowledged QoS 1 PUBLISHes) of both edges' bridges, see scenario 7.
S7_DRAIN_MS=150; S7_LAT_MS=50; S7_INFLIGHT=${S7_INFLIGHT:-1000}; S7_WIDE=${S7_WIDE:-20000}

MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
[ -x "$MOSQUITTO" ] || { echo "needs $MOSQUITTO (apt-get install mosquitto)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
  cargo build --release -p waystation -p waystation-bench -p waystation-linksim
fi
WS=$CARGO_TARGET_DIR/release/waystation
WSB=$CARGO_TARGET_DIR/release/wsbench
LINKSIM=$CARGO_TARGET_DIR/release/linksim
if { want 7 || want 12; } && [ ! -x "$LINKSIM" ]; then echo "needs $LINKSIM (cargo build --release -p waystation-linksim)" >&2; exit 1; fi

# Idle clients (up to IDLE_BIG): the tool and the brokers (children of this shell) need one
# descriptor each per connection. Raising the hard limit needs CAP_SYS_RESOURCE (root on a
# plain machine; not in every container): without it, the soft limit goes up to the hard one
# and the big idle run is capped below it (said in the log and the table).
want_nofile=$((IDLE_BIG + 1000)); [ "$want_nofile" -lt 65536 ] && want_nofile=65536
if ! ulimit -n "$want_nofile" 2>/dev/null; then ulimit -n "$(ulimit -Hn)"; fi

OUT=${BENCH_OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES=$OUT/results.jsonl
: > "$RES"
# Brokers keep their data on the real disk (the durable log must not be on tmpfs).
case "$(df --output=fstype "$OUT" | tail -1)" in
  tmpfs|ramfs) echo "warning: $OUT is on $(df --output=fstype "$OUT" | tail -1): durable writes are not measured" >&2 ;;
esac
LOG=$OUT/bench.log
say() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the ephemeral range (32768-60999), so no client socket holds a port we pick.
NEXT_PORT=$((20000 + RANDOM % 10000))
free_port() {
  while port_open "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
  PORT=$NEXT_PORT
  NEXT_PORT=$((NEXT_PORT + 1))
}
wait_port() {
  for _ in $(seq 1 400); do port_open "$1" && return 0; sleep 0.025; done
  echo "nothing listens on $1" >&2; return 1
}
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
N=0
newdir() { N=$((N + 1)); DIR=$OUT/run-$N-$1; mkdir -p "$DIR"; }

# start_waystation PORT [UPSTREAM_PORT [UPSTREAM2_PORT]]: durable acks (a bridge forwards
# sensors/#, so every message is on disk before its PUBACK); without an upstream port the bridge
# points at a closed port (messages wait on disk). EDGE_INFLIGHT=N sets the bridges' window
# (default 300); WS_MAX_PACKET=N its [limits] max_packet_size (default: the daemon's, 1 MiB);
# WS_HTTP_PORT=N its HTTP server's port (default: the daemon's, 8080). Sets BPID.
start_waystation() {
  local port=$1 up=${2:-} up2=${3:-}
  newdir waystation
  if [ -z "$up" ]; then free_port; up=$PORT; fi
  cat > "$DIR/waystation.toml" <<EOF
[gateway]
data_dir = "$DIR/data"
[[listener]]
bind = "127.0.0.1:$port"
[limits]
max_connections = ${WS_MAX_CONN:-20000}
# Like Mosquitto's max_queued_messages 0 below: a subscriber that falls behind loses nothing.
max_queued_messages = 100000000
max_queued_bytes = 17179869184
# Every benchmark client comes from 127.0.0.1 (the default allows 20/s, burst 1000, per address).
max_connection_rate = 0
${WS_MAX_PACKET:+max_packet_size = $WS_MAX_PACKET}
[storage]
max_bytes = 4294967296
EOF
  # WS_NO_BRIDGE=1: a local broker only (scenario 1's waystation-local row: no log append).
  [ -n "${WS_NO_BRIDGE:-}" ] || cat >> "$DIR/waystation.toml" <<EOF
[[bridge]]
name = "cloud"
address = "127.0.0.1:$up"
# The window (QoS 1 in flight; a crash duplicates at most twice it). On loopback a slot is
# free again at its PUBACK, so 300 drains into Mosquitto at about its own one-client ceiling
# (docs/BENCHMARKS.md, issue 11). Scenario 7 sets its own.
max_inflight = ${EDGE_INFLIGHT:-300}
reconnect = { initial_ms = 500, max_ms = 5000 }
[[bridge.forward]]
local = "sensors/#"
remote_prefix = ""
qos = 1
EOF
  if [ -n "$up2" ]; then
    cat >> "$DIR/waystation.toml" <<EOF
[[bridge]]
name = "alt"
address = "127.0.0.1:$up2"
max_inflight = ${EDGE_INFLIGHT:-300}
reconnect = { initial_ms = 500, max_ms = 5000 }
[[bridge.forward]]
local = "sensors/#"
remote_prefix = ""
qos = 1
EOF
  fi
  if [ -n "${WS_HTTP_PORT:-}" ]; then
    printf '[http]\nbind = "127.0.0.1:%s"\n' "$WS_HTTP_PORT" >> "$DIR/waystation.toml"
  fi
  "$WS" run --config "$DIR/waystation.toml" 2> "$DIR/stderr.log" &
  BPID=$!
  PIDS+=("$BPID")
  for _ in $(seq 1 400); do grep -qs "listening on" "$DIR/stderr.log" && return 0; sleep 0.025; done
  echo "waystation did not start:" >&2; cat "$DIR/stderr.log" >&2; return 1
}

# start_mosquitto PORT [BRIDGE_UPSTREAM_PORT] [persist]: Debian's mosquitto tuned not to drop
# (max_queued_messages 0 = unlimited), 100 in flight (EDGE_INFLIGHT=N: N); optionally a bridge
# or persistence. Mosquitto 2.0 has no window of a bridge's own: a bridge's context takes the
# global max_inflight_messages (context__init in src/context.c; with bridge_protocol_version
# mqttv50 the upstream's Receive Maximum replaces it), which also bounds what it sends to its
# own local subscribers.
start_mosquitto() {
  local port=$1 up=${2:-} persist=${3:-}
  newdir mosquitto
  chmod 777 "$DIR"
  cat > "$DIR/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
max_queued_messages 0
max_inflight_messages ${EDGE_INFLIGHT:-100}
log_dest stderr
log_type error
log_type warning
EOF
  if [ -n "$persist" ]; then
    printf 'persistence true\npersistence_location %s/\n' "$persist" >> "$DIR/mosquitto.conf"
  fi
  if [ -n "$up" ]; then
    cat >> "$DIR/mosquitto.conf" <<EOF
connection cloud
address 127.0.0.1:$up
topic sensors/# out 1
restart_timeout 1 5
EOF
  fi
  "$MOSQUITTO" -c "$DIR/mosquitto.conf" 2> "$DIR/stderr.log" &
  BPID=$!
  PIDS+=("$BPID")
  wait_port "$port"
}

# start_rumqttd PORT [V5_PORT]: rumqttd's v4 listener on PORT, and an MQTT 5 one on V5_PORT.
start_rumqttd() {
  newdir rumqttd
  "$WSB" rumqttd --port "$1" ${2:+--v5-port "$2"} ${RUMQTTD_MAX_CONN:+--max-connections "$RUMQTTD_MAX_CONN"} 2> "$DIR/stderr.log" &
  BPID=$!
  PIDS+=("$BPID")
  wait_port "$1"
  if [ -n "${2:-}" ]; then wait_port "$2"; fi
}

# start_linksim PORT TARGET_PORT [linksim flags...]: the link simulator (tests/linksim) listening
# on PORT, forwarding each connection to TARGET_PORT. Sets LPID and LOUT (its stdout).
start_linksim() {
  local port=$1 target=$2
  shift 2
  newdir linksim
  LOUT=$DIR/linksim.out
  "$LINKSIM" --listen "127.0.0.1:$port" --target "127.0.0.1:$target" "$@" > "$LOUT" 2> "$DIR/stderr.log" &
  LPID=$!
  PIDS+=("$LPID")
  for _ in $(seq 1 400); do grep -qs "^linksim listening on" "$LOUT" && return 0; sleep 0.025; done
  echo "linksim did not start:" >&2; cat "$DIR/stderr.log" >&2; return 1
}

# stop_linksim: SIGTERM, then its counters (printed as it exits) into LINK_ACCEPTED, LINK_UP
# (bytes delivered to the upstream), LINK_DOWN (bytes delivered to the edge), LINK_RESETS,
# LINK_ZOMBIES; all empty if it printed none (killed).
stop_linksim() {
  stop_pid "$LPID"
  local line k
  line=$(grep -s "^linksim stats:" "$LOUT" | tail -1 || true)
  for k in accepted bytes_up bytes_down resets zombies; do
    printf -v "LINK_${k^^}" '%s' "$(sed -n "s/.* $k=\([0-9]*\).*/\1/p" <<<"$line")"
  done
  LINK_UP=$LINK_BYTES_UP; LINK_DOWN=$LINK_BYTES_DOWN
}

# start_broker NAME PORT
start_broker() {
  case "$1" in
    waystation) start_waystation "$2" ;;
    waystation-local) WS_NO_BRIDGE=1 start_waystation "$2" ;;
    mosquitto) start_mosquitto "$2" ;;
    rumqttd) start_rumqttd "$2" ;;
  esac
}

# One failed measurement is reported and the comparison goes on.
bench() {
  local rc=0
  "$WSB" "$@" || rc=$?
  [ "$rc" = 0 ] || say "FAILED (exit $rc): wsbench $* (details in $LOG)"
}

BROKERS=(waystation mosquitto rumqttd)
# Rotate the order each round so no broker always runs first (or right after a heavy one).
order() {
  local r=$1 n=${#BROKERS[@]} i
  for i in $(seq 0 $((n - 1))); do echo "${BROKERS[$(((i + r) % n))]}"; done
}

say "mode=$MODE rounds=$ROUNDS out=$OUT"
say "machine: $(nproc) cores, $(free -m | awk '/Mem:/{print $2}') MiB, $(uname -r)"
"$MOSQUITTO" -h 2>/dev/null | head -1 | tee -a "$LOG" >&2 || true

# 1. Fan-in: 8 publishers x S1_MSGS x 64 B, one subscriber on sensors/#, QoS 1 and QoS 0.
# QoS 1 runs again with MQTT 5 publishers (rows "<broker>-v5"; the subscriber stays 3.1.1;
# S1_V5=0 skips them, S1_V5_PROPS=1 gives each PUBLISH a message expiry and a user property).
# rumqttd serves MQTT 5 only on a listener of its own (its v4 listener closes a v5 CONNECT):
# its v5 publishers connect there, the subscriber to its v4 listener, one router behind both.
S1_V5=${S1_V5:-1}
if want 1; then
  for r in $(seq 1 "$ROUNDS"); do
    for q in 1 0; do
      # QoS 0 also into a Waystation with no bridge (waystation-local): without a forward rule
      # nothing is appended to the durable log, the same work as rumqttd's (S1_LOCAL=0 skips).
      locals=(); [ "$q" = 0 ] && [ "${S1_LOCAL:-1}" = 1 ] && locals=(waystation-local)
      for b in $(order "$r") "${locals[@]}"; do
        versions=4
        if [ "$q" = 1 ] && [ "$S1_V5" = 1 ]; then versions=$( ((r % 2)) && echo "4 5" || echo "5 4"); fi
        for v in $versions; do
          free_port; p=$PORT; pub=$p; label=$b; v5args=()
          if [ "$v" = 5 ]; then
            label=$b-v5; v5args=(--protocol 5)
            if [ "${S1_V5_PROPS:-0}" = 1 ]; then v5args+=(--v5-properties); fi
          fi
          if [ "$b" = rumqttd ] && [ "$v" = 5 ]; then
            free_port; pub=$PORT
            start_rumqttd "$p" "$pub"
          else
            start_broker "$b" "$p"
          fi
          say "s1 qos$q $label round $r"
          bench run --addr "127.0.0.1:$pub" --sub-addr "127.0.0.1:$p" --publishers 8 --messages "$S1_MSGS" --qos "$q" \
            --payload 64 "${v5args[@]}" --subscribers 1 --pid "$BPID" --scenario "s1-qos$q" --broker "$label" --round "$r" \
            --out "$RES" >/dev/null 2>>"$LOG"
          stop_pid "$BPID"
        done
      done
    done
  done
fi

# 2. Many devices: S2_CLIENTS clients at 1 msg/s (QoS 1) + one subscriber; then idle clients.
if want 2; then
  for r in $(seq 1 "$S2_ROUNDS"); do
    for b in $(order "$r"); do
      free_port; p=$PORT
      start_broker "$b" "$p"
      say "s2 $S2_CLIENTS clients at 1 msg/s, $b round $r"
      bench run --addr "127.0.0.1:$p" --publishers "$S2_CLIENTS" --rate 1 --duration "$S2_SECS" --qos 1 --payload 64 \
        --subscribers 1 --pid "$BPID" --scenario s2-1msgps --broker "$b" --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
      stop_pid "$BPID"
    done
  done
  # Idle clients at IDLE_CLIENTS and IDLE_BIG (spread over 127.0.0.x source addresses, 5,000
  # each), as many as this shell's open files limit allows for both the tool and the broker.
  IDLE_MAX=$(( $(ulimit -n) - 200 ))
  IDLE_BIG_RUN=$IDLE_BIG
  if [ "$IDLE_BIG_RUN" -gt "$IDLE_MAX" ]; then
    say "s2: $IDLE_BIG idle clients need $((IDLE_BIG + 200)) descriptors per process; the open files limit is $(ulimit -n) (hard $(ulimit -Hn)): running $IDLE_MAX"
    IDLE_BIG_RUN=$IDLE_MAX
  fi
  # Then IDLE_CLIENTS again, each subscribed to its own devices/<i>/cmd (issue 14's idle
  # client: connected, one filter, nothing in flight).
  for n in $IDLE_CLIENTS $IDLE_BIG_RUN sub; do
    scen=s2-idle; sub=(); [ "$n" != "$IDLE_CLIENTS" ] && scen=s2-idle-big
    if [ "$n" = sub ]; then n=$IDLE_CLIENTS; scen=s2-idle-sub; sub=(--subscribe 'devices/{i}/cmd'); fi
    for b in $(order 0); do
      free_port; p=$PORT
      WS_MAX_CONN=$((n + 1000)) RUMQTTD_MAX_CONN=$((n + 1000)) start_broker "$b" "$p"
      sleep 0.5
      say "s2 $n idle clients ($scen), $b"
      bench idle --addr "127.0.0.1:$p" --clients "$n" --hold 2 --pid "$BPID" "${sub[@]}" \
        --scenario "$scen" --broker "$b" --round 1 --out "$RES" >/dev/null 2>>"$LOG"
      stop_pid "$BPID"
    done
  done
fi

# start_edge NAME PORT UPSTREAM_PORT: Waystation's bridge or Mosquitto configured as a bridge
# (EDGE_INFLIGHT=N start_edge ...: both with a window of N).
start_edge() {
  case "$1" in
    waystation) start_waystation "$2" "$3" ;;
    mosquitto-bridge) start_mosquitto "$2" "$3" ;;
  esac
}

# 3. Edge to cloud: publishers -> edge -> upstream Mosquitto -> subscriber on the upstream.
if want 3; then
  for r in $(seq 1 "$ROUNDS"); do
    for b in $( ((r % 2)) && echo waystation mosquitto-bridge || echo mosquitto-bridge waystation); do
      free_port; up=$PORT; free_port; p=$PORT
      start_mosquitto "$up"; UPID=$BPID
      start_edge "$b" "$p" "$up"; EPID=$BPID
      sleep 0.5   # let the bridge connect
      say "s3 edge->cloud $b round $r"
      bench run --addr "127.0.0.1:$p" --sub-addr "127.0.0.1:$up" --publishers 8 --messages "$S3_MSGS" --qos 1 \
        --payload 64 --subscribers 1 --pid "$EPID" --idle-timeout 10 \
        --scenario s3-bridge --broker "$b" --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
      stop_pid "$EPID"; stop_pid "$UPID"
    done
  done
  # The same at a fixed rate, with the upstream stopped (SIGTERM, restarted after S3_DOWN_FOR s).
  # The upstream keeps sessions on disk (persistence) and its subscriber uses clean_session=0
  # and reconnects, so every loss is the edge's.
  for b in waystation mosquitto-bridge; do
    free_port; up=$PORT; free_port; p=$PORT
    newdir upstream-persist; PERSIST=$DIR; chmod 777 "$PERSIST"
    start_mosquitto "$up" "" "$PERSIST"; UPID=$BPID; UCONF=$DIR/mosquitto.conf
    start_edge "$b" "$p" "$up"; EPID=$BPID
    sleep 0.5
    say "s3 outage $b: ${S3_DOWN_FOR}s upstream stop at ${S3_DOWN_AT}s"
    bench run --addr "127.0.0.1:$p" --sub-addr "127.0.0.1:$up" --publishers 8 --rate "$S3_RATE" --duration "$S3_SECS" \
      --qos 1 --payload 64 --subscribers 1 --sub-persistent --sub-reconnect --pid "$EPID" --idle-timeout 15 \
      --scenario s3-outage --broker "$b" --round 1 --out "$RES" >/dev/null 2>>"$LOG" &
    LOAD=$!
    sleep "$S3_DOWN_AT"
    stop_pid "$UPID"
    sleep "$S3_DOWN_FOR"
    "$MOSQUITTO" -c "$UCONF" 2>> "$PERSIST/../upstream-restart.log" &
    UPID=$!; PIDS+=("$UPID")
    wait "$LOAD" || true
    stop_pid "$EPID"; stop_pid "$UPID"
  done
fi

# 4. Backlog drain: S4_TOTAL messages published while the upstream is down, then drained.
if want 4; then
  per=$((S4_TOTAL / 8))
  for r in $(seq 1 "$S4_ROUNDS"); do
  # Waystation, two bridges: "cloud" -> Mosquitto, "alt" -> rumqttd; both down while buffering.
  free_port; up1=$PORT; free_port; up2=$PORT; free_port; p=$PORT
  start_waystation "$p" "$up1" "$up2"; EPID=$BPID; EDIR=$DIR
  say "s4 waystation: buffering $S4_TOTAL messages (upstreams down), round $r"
  bench run --addr "127.0.0.1:$p" --publishers 8 --messages "$per" --qos 1 --payload 64 --subscribers 0 \
    --pid "$EPID" --scenario s4-buffer --broker waystation --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
  sleep 2
  read -r rss hwm < <("$WSB" mem --pid "$EPID")
  "$WSB" record --scenario s4-waiting --broker waystation --round "$r" --set "rss_waiting_mib=$(echo "$rss / 1024" | bc -l)" \
    --set "hwm_mib=$(echo "$hwm / 1024" | bc -l)" --set "store_disk_mib=$(du -sm "$EDIR/data" | cut -f1)" --out "$RES" >/dev/null 2>>"$LOG"
  for up in mosquitto rumqttd; do
    if [ "$up" = mosquitto ]; then uport=$up1; else uport=$up2; fi
    bench sub --addr "127.0.0.1:$uport" --expect "$((per * 8))" --idle-timeout 10 --pid "$EPID" \
      --scenario "s4-drain-$up" --broker waystation --round "$r" --out "$RES" >/dev/null 2>>"$LOG" &
    SUB=$!
    sleep 0.2
    say "s4 waystation: draining into $up"
    if [ "$up" = mosquitto ]; then start_mosquitto "$uport"; else start_rumqttd "$uport"; fi
    UPID=$BPID
    wait "$SUB" || true
    say "s4 ceiling of $up: one QoS 1 publisher straight into it"
    bench run --addr "127.0.0.1:$uport" --publishers 1 --messages "$S4_CEIL" --qos 1 --payload 64 --subscribers 1 \
      --client-prefix ceil --scenario "s4-ceiling-$up" --broker "$up" --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
    stop_pid "$UPID"
  done
  stop_pid "$EPID"

  # Mosquitto as the edge bridge: the backlog waits in its memory.
  free_port; up=$PORT; free_port; p=$PORT
  start_mosquitto "$p" "$up"; EPID=$BPID
  say "s4 mosquitto-bridge: buffering $S4_TOTAL messages (upstream down), round $r"
  bench run --addr "127.0.0.1:$p" --publishers 8 --messages "$per" --qos 1 --payload 64 --subscribers 0 \
    --pid "$EPID" --scenario s4-buffer --broker mosquitto-bridge --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
  sleep 2
  read -r rss hwm < <("$WSB" mem --pid "$EPID")
  "$WSB" record --scenario s4-waiting --broker mosquitto-bridge --round "$r" --set "rss_waiting_mib=$(echo "$rss / 1024" | bc -l)" \
    --set "hwm_mib=$(echo "$hwm / 1024" | bc -l)" --out "$RES" >/dev/null 2>>"$LOG"
  bench sub --addr "127.0.0.1:$up" --expect "$((per * 8))" --idle-timeout 10 --pid "$EPID" \
    --scenario s4-drain-mosquitto --broker mosquitto-bridge --round "$r" --out "$RES" >/dev/null 2>>"$LOG" &
  SUB=$!
  sleep 0.2
  say "s4 mosquitto-bridge: draining into mosquitto"
  start_mosquitto "$up"; UPID=$BPID
  wait "$SUB" || true
  stop_pid "$UPID"; stop_pid "$EPID"
  done
fi

# 5. Idle footprint: RSS with no clients, and binary size.
if want 5; then
  for b in "${BROKERS[@]}"; do
    free_port; p=$PORT
    start_broker "$b" "$p"
    sleep 1
    read -r rss hwm < <("$WSB" mem --pid "$BPID")
    case "$b" in
      waystation) bin=$WS ;;
      mosquitto) bin=$MOSQUITTO ;;
      rumqttd) bin=$WSB ;;
    esac
    "$WSB" record --scenario s5-idle --broker "$b" --set "rss_idle_mib=$(echo "$rss / 1024" | bc -l)" \
      --set "binary_mib=$(echo "$(stat -c %s "$bin") / 1048576" | bc -l)" --out "$RES" >/dev/null 2>>"$LOG"
    stop_pid "$BPID"
  done
fi

# 6. Memory against the backlog: one Waystation, upstream down, S6_STEP messages added per step;
# VmRSS after each step, then after a restart (recovery of the whole log). Flat is the target.
S6_ROWS=""
if want 6; then
  # Two bridges, both upstreams down; after the restart one drains while the other stays down,
  # so the drain reads the whole backlog and deletes none of it.
  free_port; p=$PORT; free_port; u1=$PORT; free_port; u2=$PORT
  start_waystation "$p" "$u1" "$u2"; EPID=$BPID; EDIR=$DIR
  sleep 1
  read -r rss hwm < <("$WSB" mem --pid "$EPID")
  S6_ROWS="| 0 | $(printf %.1f "$(echo "$rss / 1024" | bc -l)") | 0 |"
  per=$((S6_STEP / 8))
  for i in $(seq 1 "$S6_STEPS"); do
    say "s6: backlog step $i of $S6_STEPS (+$S6_STEP)"
    bench run --addr "127.0.0.1:$p" --publishers 8 --messages "$per" --qos 1 --payload 64 --subscribers 0 \
      --client-prefix "s6-$i" --publisher-base "$(((i - 1) * 8))" --pid "$EPID" --scenario s6-step --broker waystation --round "$i" --out "$RES" >/dev/null 2>>"$LOG"
    sleep 2
    read -r rss hwm < <("$WSB" mem --pid "$EPID")
    rss_mib=$(printf %.1f "$(echo "$rss / 1024" | bc -l)")
    disk=$(du -sm "$EDIR/data" | cut -f1)
    "$WSB" record --scenario s6-backlog --broker waystation --round "$i" --set "waiting=$((i * S6_STEP))" \
      --set "rss_mib=$rss_mib" --set "store_disk_mib=$disk" --out "$RES" >/dev/null 2>>"$LOG"
    S6_ROWS="$S6_ROWS
| $((i * S6_STEP)) | $rss_mib | $disk |"
  done
  say "s6: restart with $((S6_STEPS * S6_STEP)) waiting"
  stop_pid "$EPID"
  "$WS" run --config "$EDIR/waystation.toml" 2> "$EDIR/stderr-restart.log" &
  EPID=$!; PIDS+=("$EPID")
  for _ in $(seq 1 2400); do grep -qs "listening on" "$EDIR/stderr-restart.log" && break; sleep 0.025; done
  sleep 2
  read -r rss hwm < <("$WSB" mem --pid "$EPID")
  S6_ROWS="$S6_ROWS
| $((S6_STEPS * S6_STEP)) after a restart | $(printf %.1f "$(echo "$rss / 1024" | bc -l)") (peak $(printf %.1f "$(echo "$hwm / 1024" | bc -l)")) | $(du -sm "$EDIR/data" | cut -f1) |"
  say "s6: one bridge drains $((S6_STEPS * S6_STEP)) into Mosquitto, the other upstream stays down"
  bench sub --addr "127.0.0.1:$u1" --expect "$((S6_STEPS * S6_STEP))" --idle-timeout 10 --pid "$EPID" \
    --scenario s6-drain --broker waystation --round 1 --out "$RES" >/dev/null 2>>"$LOG" &
  SUB=$!
  sleep 0.2
  start_mosquitto "$u1"; UPID=$BPID
  wait "$SUB" || true
  read -r rss hwm < <("$WSB" mem --pid "$EPID")
  S6_ROWS="$S6_ROWS
| $((S6_STEPS * S6_STEP)) after one bridge drained it all (the other still waits) | $(printf %.1f "$(echo "$rss / 1024" | bc -l)") (peak since the restart $(printf %.1f "$(echo "$hwm / 1024" | bc -l)")) | $(du -sm "$EDIR/data" | cut -f1) |"
  stop_pid "$UPID"
  stop_pid "$EPID"
fi

# 7. The uplink over a simulated WAN link: edge (Waystation's bridge, or Mosquitto as a bridge)
# -> linksim -> upstream Mosquitto; the subscriber sits on the upstream (loopback), publishers on
# the edge. Both edges are given the same bridge window, S7_INFLIGHT (default 1000):
# Waystation's [[bridge]] max_inflight, Mosquitto's global max_inflight_messages (the only
# in-flight limit a Mosquitto 2.0 bridge has, see start_mosquitto). A QoS 1 drain over a long
# link is paced by window / round trip: 1000 over 2 x 150 ms allows at most ~3,300 msg/s (300,
# the other scenarios' window, ~1,000 msg/s: 100 s per edge for the full drain).
# But Mosquitto 2.0.11 does not hold that window for a backlog: each in-order PUBACK moves up
# to max_inflight_messages more queued messages into flight (db__message_delete_outgoing counts
# the acked message's position, not what is in flight; fixed in 2.0.13, mosquitto #2306), so
# its drain runs with, in effect, no window at all. Hence a third drain: Waystation with a
# window of S7_WIDE (default 20000, 0 = skip), as broker waystation-w<S7_WIDE>.
if want 7; then
  # a) Drain: S7_DRAIN messages buffered while the link is down (linksim not started: the edge's
  # bridge points at a closed port), then the link comes up with S7_DRAIN_MS each way. The
  # subscriber times the drain (first to last arrival, so reconnect back-off is not counted).
  # linksim only runs for the drain, so the bytes it carried are the drain's (plus CONNECT and
  # pings); it is stopped a little after the last message so the last PUBACKs are counted.
  per=$((S7_DRAIN / 8))
  s7_drains="waystation:$S7_INFLIGHT mosquitto-bridge:$S7_INFLIGHT"
  if [ "$S7_WIDE" -gt 0 ]; then s7_drains="$s7_drains waystation-w$S7_WIDE:$S7_WIDE"; fi
  for e in $s7_drains; do
    b=${e%%:*}; win=${e##*:}
    free_port; up=$PORT; free_port; lp=$PORT; free_port; p=$PORT
    start_mosquitto "$up"; UPID=$BPID
    if [ "$b" = mosquitto-bridge ]; then
      EDGE_INFLIGHT=$win start_mosquitto "$p" "$lp"
    else
      EDGE_INFLIGHT=$win start_waystation "$p" "$lp"
    fi
    EPID=$BPID
    say "s7 $b: buffering $S7_DRAIN messages (link down), window $win"
    bench run --addr "127.0.0.1:$p" --publishers 8 --messages "$per" --qos 1 --payload 64 --subscribers 0 \
      --client-prefix s7buf --pid "$EPID" --scenario s7-buffer --broker "$b" --round 1 --out "$RES" >/dev/null 2>>"$LOG"
    newdir s7-drain-sub; SUBOUT=$DIR/sub.json
    bench sub --addr "127.0.0.1:$up" --expect "$S7_DRAIN" --idle-timeout 10 --max-time "$S7_SUB_MAX" --pid "$EPID" \
      --client-id s7-drain --scenario s7-drain --broker "$b" --round 1 --out "$RES" >"$SUBOUT" 2>>"$LOG" &
    SUB=$!
    sleep 0.5   # the subscriber is connected (loopback) before anything can arrive
    say "s7 $b: link up (${S7_DRAIN_MS} ms each way), draining $S7_DRAIN into mosquitto"
    start_linksim "$lp" "$up" --latency-ms "$S7_DRAIN_MS"
    wait "$SUB" || true
    sleep "$(echo "2 * $S7_DRAIN_MS / 1000 + 1" | bc -l)"   # the last PUBACKs cross back
    stop_linksim
    delivered=$(grep -o '"unique":[0-9.e+]*' "$SUBOUT" | head -1 | cut -d: -f2 || true)
    if [ -n "$LINK_UP" ] && [ -n "$delivered" ] && [ "$(echo "$delivered > 0" | bc -l)" = 1 ]; then
      "$WSB" record --scenario s7-wire --broker "$b" --round 1 \
        --set "bytes_up_per_msg=$(echo "$LINK_UP / $delivered" | bc -l)" \
        --set "bytes_down_per_msg=$(echo "$LINK_DOWN / $delivered" | bc -l)" \
        --set "bytes_up=$LINK_UP" --set "bytes_down=$LINK_DOWN" --set "delivered=$delivered" \
        --set "connections=$LINK_ACCEPTED" --set "resets=$LINK_RESETS" --out "$RES" >/dev/null 2>>"$LOG"
    else
      say "s7 $b: no byte counts (linksim bytes_up '${LINK_UP:-none}', delivered '${delivered:-none}')"
    fi
    stop_pid "$EPID"; stop_pid "$UPID"
  done

  # b) Forwarding latency at 4 x 250 msg/s (QoS 1, 64 B) for S7_LAT_SECS, from publish on the
  # edge to arrival at the upstream's subscriber: over loopback, and through linksim at
  # S7_LAT_MS each way; S7_ROUNDS rounds, the edges' order alternating. A short warm-up first,
  # unrecorded, so the bridge is connected when the clock starts.
  for r in $(seq 1 "$S7_ROUNDS"); do
    for link in loopback wan; do
      w=0; [ "$link" = wan ] && w=1
      if (( (r + w) % 2 )); then edges="waystation mosquitto-bridge"; else edges="mosquitto-bridge waystation"; fi
      for b in $edges; do
        free_port; up=$PORT; free_port; p=$PORT
        start_mosquitto "$up"; UPID=$BPID
        if [ "$link" = wan ]; then
          free_port; lp=$PORT
          start_linksim "$lp" "$up" --latency-ms "$S7_LAT_MS"
          target=$lp; scen=s7-latency-wan$S7_LAT_MS
        else
          target=$up; scen=s7-latency-loopback
        fi
        EDGE_INFLIGHT=$S7_INFLIGHT start_edge "$b" "$p" "$target"; EPID=$BPID
        "$WSB" run --addr "127.0.0.1:$p" --sub-addr "127.0.0.1:$up" --publishers 1 --messages 20 --qos 1 --payload 64 \
          --subscribers 1 --client-prefix s7warm --idle-timeout 5 --max-time 30 --scenario s7-warmup --broker "$b" >/dev/null 2>>"$LOG" \
          || say "s7 $b $link: warm-up failed (see $LOG)"
        say "s7 latency $b over $link: 4 x 250 msg/s for ${S7_LAT_SECS} s, round $r"
        bench run --addr "127.0.0.1:$p" --sub-addr "127.0.0.1:$up" --publishers 4 --rate 250 --duration "$S7_LAT_SECS" \
          --qos 1 --payload 64 --subscribers 1 --client-prefix s7lat --pid "$EPID" --idle-timeout 10 \
          --scenario "$scen" --broker "$b" --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
        stop_pid "$EPID"
        if [ "$link" = wan ]; then stop_linksim; fi
        stop_pid "$UPID"
      done
    done
  done
fi

# A sample of Waystation's /metrics on 127.0.0.1:PORT by its full name (empty if absent).
ws_metric() {
  local body
  body=$(curl -s --max-time 5 "http://127.0.0.1:$1/metrics" || true)
  awk -v m="$2" '$1 == m { print $2; exit }' <<<"$body"
}

# 8. QoS 0 flood (issue 17): S8_PUBS publishers x S8_PER QoS 0 x 64 B, as fast as each can write,
# to a forwarded topic while the upstream is frozen (SIGSTOP once the edge's bridge is connected:
# connections stay open, nothing is answered). Memory is what is at stake: QoS 0 never waits for
# an ack, so only the edge itself can bound what piles up in front of its disk (Waystation:
# [storage] max_pending_bytes, default 8 MiB, then it stops reading from publishers).
# - flooder msg/s: messages / time for the publishers to write them all into their sockets (for
#   Waystation set by its disk through back-pressure; the last few MB still sit in socket
#   buffers when the flooders finish);
# - peak RSS: VmRSS sampled every 50 ms during the flood, and VmHWM read 2 s after it;
# - Waystation: ingested msg/s (all S8_PUBS x S8_PER read and stored:
#   waystation_messages_received_total{qos="0"}, per second from the start) and
#   waystation_ingest_pauses_total. (Not the log's length: the bridge counts a QoS 0 entry done
#   once handed to its writer, frozen upstream or not.)
# Mosquitto for reference: persistence on (written at exit or autosave, not per message), its own
# bridge (`topic sensors/# out 1`) to a frozen upstream: the queue for the bridge is in memory.
if want 8; then
  total=$((S8_PUBS * S8_PER))
  for r in $(seq 1 "$S8_ROUNDS"); do
    for b in waystation mosquitto-bridge; do
      free_port; up=$PORT; free_port; p=$PORT; free_port; hp=$PORT
      start_mosquitto "$up"; UPID=$BPID
      if [ "$b" = waystation ]; then
        WS_HTTP_PORT=$hp start_waystation "$p" "$up"
      else
        newdir mosquitto-persist; persist=$DIR; chmod 777 "$persist"
        start_mosquitto "$p" "$up" "$persist"
      fi
      EPID=$BPID
      sleep 1   # the edge's bridge connects
      kill -STOP "$UPID"
      say "s8 QoS 0 flood $b: $S8_PUBS x $S8_PER x 64 B, upstream frozen, round $r"
      t0=$(date +%s.%N)
      bench run --addr "127.0.0.1:$p" --publishers "$S8_PUBS" --messages "$S8_PER" --qos 0 --payload 64 \
        --subscribers 0 --client-prefix s8 --pid "$EPID" --scenario s8-flood --broker "$b" --round "$r" \
        --out "$RES" >/dev/null 2>>"$LOG"
      extra=()
      if [ "$b" = waystation ]; then
        ingested=""
        for _ in $(seq 1 1200); do
          n=$(ws_metric "$hp" 'waystation_messages_received_total{qos="0"}')
          if [ -n "$n" ] && [ "$(echo "$n >= $total" | bc -l)" = 1 ]; then ingested=$(date +%s.%N); break; fi
          sleep 0.1
        done
        if [ -n "$ingested" ]; then
          extra+=(--set "ingest_rate=$(echo "$total / ($ingested - $t0)" | bc -l)")
        else
          say "s8 $b: not all $total messages ingested after 120 s (waystation_messages_received_total{qos=\"0\"} ${n:-none})"
        fi
        pauses=$(ws_metric "$hp" waystation_ingest_pauses_total)
        [ -n "$pauses" ] && extra+=(--set "ingest_pauses=$pauses")
      fi
      sleep 2
      read -r rss hwm < <("$WSB" mem --pid "$EPID")
      "$WSB" record --scenario s8-memory --broker "$b" --round "$r" --set "hwm_mib=$(echo "$hwm / 1024" | bc -l)" \
        --set "rss_after_mib=$(echo "$rss / 1024" | bc -l)" "${extra[@]}" --out "$RES" >/dev/null 2>>"$LOG"
      stop_pid "$EPID"
      kill -CONT "$UPID" 2>/dev/null || true
      stop_pid "$UPID"
    done
  done
fi

# 9. Large messages (issue 17): one publisher, S9_MSGS QoS 1 messages of 1 MiB, at most
# S9_INFLIGHT unacknowledged, one QoS 1 subscriber on sensors/#; MiB/s of payload acknowledged
# (PUBACKs) and delivered. Waystation (max_packet_size 16842752) writes each message (in 7 KiB
# parts, one atomic batch) and fsyncs before its PUBACK; its bridge points at a closed port, as in
# 1, so every message is kept. Mosquitto acknowledges from memory. rumqttd is left out (its
# max_payload_size here is 256 KiB and it keeps nothing).
if want 9; then
  for r in $(seq 1 "$ROUNDS"); do
    for b in $( ((r % 2)) && echo waystation mosquitto || echo mosquitto waystation); do
      free_port; p=$PORT
      if [ "$b" = waystation ]; then
        WS_MAX_PACKET=$S9_MAX_PACKET start_waystation "$p"
      else
        start_mosquitto "$p"
      fi
      say "s9 large messages $b: $S9_MSGS x $S9_PAYLOAD B QoS 1, window $S9_INFLIGHT, round $r"
      bench run --addr "127.0.0.1:$p" --publishers 1 --messages "$S9_MSGS" --qos 1 --payload "$S9_PAYLOAD" \
        --inflight "$S9_INFLIGHT" --subscribers 1 --client-prefix s9 --pid "$BPID" --scenario s9-large \
        --broker "$b" --round "$r" --out "$RES" >/dev/null 2>>"$LOG"
      stop_pid "$BPID"
    done
  done
fi

# 10. Open-loop latency (issue 14): each broker's own saturation first (closed loop, 8 QoS 1
# publishers x S10_SAT x 64 B, one subscriber: the rate it delivers them at, from the first
# publish to the subscriber's last message; a broker that acknowledges faster than it can
# deliver, Waystation's and rumqttd's, cannot sustain its acked rate: "50%" of it put
# Waystation at 57-59% of what it delivers and rumqttd past it: docs/BENCHMARKS.md), then 8
# publishers on a fixed schedule (message i due at start + i/rate, stamped with that time, so
# a broker that makes senders wait is charged: no coordinated omission) at 25, 50 and 90% of
# that rate for S10_SECS s each, a fresh broker per run. Latency publish->subscriber and publish->PUBACK.
# Waystation acknowledges after fsync (its bridge points at a closed port, so every message is
# written); its /metrics before and after each run give commits, mean batch and mean fsync.
# Mosquitto: persistence on (it acknowledges from memory; the file is written at exit or
# autosave).
S10_LOADS=${S10_LOADS:-"25 50 90"}
# start_s10 NAME PORT: the broker as scenario 10 runs it (sets BPID; HP: Waystation's HTTP port).
start_s10() {
  case "$1" in
    waystation) free_port; HP=$PORT; WS_HTTP_PORT=$HP start_waystation "$2" ;;
    mosquitto) newdir mosquitto-persist; local d=$DIR; chmod 777 "$d"; start_mosquitto "$2" "" "$d" ;;
    rumqttd) start_rumqttd "$2" ;;
  esac
}
# ws_commit_read HTTP_PORT: Waystation's commit counters from /metrics into C_N (commits),
# C_S (seconds spent in fsync) and B_S (operations committed).
ws_commit_read() {
  local hp=$1
  C_N=$(ws_metric "$hp" waystation_commit_sync_seconds_count); C_S=$(ws_metric "$hp" waystation_commit_sync_seconds_sum)
  B_S=$(ws_metric "$hp" waystation_commit_batch_ops_sum)
  C_N=${C_N:-0}; C_S=${C_S:-0}; B_S=${B_S:-0}
}
if want 10; then
  for b in "${BROKERS[@]}"; do
    free_port; p=$PORT
    start_s10 "$b" "$p"
    say "s10 saturation $b: 8 x $S10_SAT QoS 1 closed loop"
    sat=$("$WSB" run --addr "127.0.0.1:$p" --publishers 8 --messages "$S10_SAT" --qos 1 --payload 64 --subscribers 1 \
      --pid "$BPID" --client-prefix s10sat --scenario s10-saturation --broker "$b" --round 1 --out "$RES" 2>>"$LOG" \
      | grep -o '"e2e_rate":[0-9.e+]*' | head -1 | cut -d: -f2 || true)
    stop_pid "$BPID"
    if [ -z "$sat" ]; then say "s10 $b: no saturation rate, skipped"; continue; fi
    for pct in $S10_LOADS; do
      rate=$(echo "$sat * $pct / 100 / 8" | bc -l)
      free_port; p=$PORT
      start_s10 "$b" "$p"
      [ "$b" = waystation ] && { ws_commit_read "$HP"; n0=$C_N; s0=$C_S; o0=$B_S; }
      say "s10 open loop $b at $pct% of $(printf %.0f "$sat") msg/s: 8 x $(printf %.1f "$rate") msg/s for ${S10_SECS}s"
      extra=()
      RUNOUT=$DIR/run.json
      "$WSB" run --addr "127.0.0.1:$p" --publishers 8 --rate "$rate" --duration "$S10_SECS" --open-loop --qos 1 \
        --payload 64 --subscribers 1 --idle-timeout 5 --pid "$BPID" --client-prefix s10 --scenario "s10-open-$pct" \
        --broker "$b" --round 1 >"$RUNOUT" 2>>"$LOG" || say "FAILED (exit $?): s10 $b at $pct% (details in $LOG)"
      if [ "$b" = waystation ]; then
        ws_commit_read "$HP"
        dn=$(echo "$C_N - $n0" | bc -l)
        if [ "$(echo "$dn > 0" | bc -l)" = 1 ]; then
          extra+=(--set "commits=$dn" --set "commit_sync_ms=$(echo "($C_S - $s0) * 1000 / $dn" | bc -l)" \
            --set "commit_batch=$(echo "($B_S - $o0) / $dn" | bc -l)")
        fi
      fi
      # The run's record, with the commit figures added and the load as a percentage.
      if [ -s "$RUNOUT" ]; then
        "$WSB" record --from "$RUNOUT" --scenario "s10-open-$pct" --broker "$b" --round 1 --set "load_pct=$pct" \
          --set "saturation=$sat" "${extra[@]}" --out "$RES" >/dev/null 2>>"$LOG"
      else
        say "FAILED: s10 open loop $b at $pct%"
      fi
      stop_pid "$BPID"
    done
  done
fi

# 11. QoS 0 fan-in to one subscriber on sensors/# (issue 14), 8 publishers x 64 B at a fixed
# total rate S11_RATE for S11_SECS s; the subscriber reads its socket at a limited rate (bytes/s,
# a PUBLISH of 64 B on sensors/N/temp is 82 B on the wire) while publishers are at work, then at
# full speed, so whatever the broker kept still arrives: lost = what it dropped.
# a) keeps up on average: publishers send in bursts (S11_BURST per publisher at once), the
#    subscriber reads at twice the average: 0 lost expected;
# b) stays behind: the subscriber reads at a tenth of the publish rate. What each broker does:
#    lost, the publishers' achieved rate (a broker may push back on them), peak RSS.
#    Waystation: messages_dropped{reason="qos0_slow_client"} and ingest pauses from /metrics.
S11_RATE=${S11_RATE:-20000}; S11_BURST=${S11_BURST:-200}
if want 11; then
  per=$(echo "$S11_RATE / 8" | bc -l)
  wire=$((S11_RATE * 82))
  for case in keepup behind; do
    if [ "$case" = keepup ]; then read_rate=$((wire * 2)); burst=$S11_BURST; else read_rate=$((wire / 10)); burst=1; fi
    for b in $(order 0); do
      free_port; p=$PORT
      if [ "$b" = waystation ]; then free_port; HP=$PORT; WS_HTTP_PORT=$HP start_waystation "$p"; else start_broker "$b" "$p"; fi
      say "s11 QoS 0 $case $b: 8 x $(printf %.0f "$per") msg/s (bursts of $burst) for ${S11_SECS}s, subscriber reads $read_rate B/s"
      RUNOUT=$DIR/run.json
      "$WSB" run --addr "127.0.0.1:$p" --publishers 8 --rate "$per" --duration "$S11_SECS" --burst "$burst" --qos 0 \
        --payload 64 --subscribers 1 --sub-read-rate "$read_rate" --idle-timeout 5 --max-time $((S11_SECS * 4 + 60)) \
        --pid "$BPID" --client-prefix s11 --scenario "s11-$case" --broker "$b" --round 1 >"$RUNOUT" 2>>"$LOG" \
        || say "FAILED (exit $?): s11 $case $b (details in $LOG)"
      extra=()
      if [ "$b" = waystation ]; then
        d=$(ws_metric "$HP" 'waystation_messages_dropped_total{reason="qos0_slow_client"}')
        [ -n "$d" ] && extra+=(--set "dropped_slow=$d")
        pz=$(ws_metric "$HP" waystation_ingest_pauses_total)
        [ -n "$pz" ] && extra+=(--set "ingest_pauses=$pz")
      fi
      if [ -s "$RUNOUT" ]; then
        "$WSB" record --from "$RUNOUT" --scenario "s11-$case" --broker "$b" --round 1 "${extra[@]}" --out "$RES" >/dev/null 2>>"$LOG"
      else
        say "FAILED: s11 $case $b"
      fi
      stop_pid "$BPID"
    done
  done
fi

# 12. Issue 15's edge pipeline, with firmware events (`wsbench --payload-format event-v1`: JSON
# of docs/event-schema.md, publisher N being device sim-000N on sensors/sim-000N/events, QoS 1,
# boot fixed, seq from 0).
# a) The upstream wire: S12_DEVICES x S12_EVENTS events into each edge, whose bridge goes
#    through linksim (no delay) to one upstream Mosquitto, so linksim counts every byte on the
#    upstream connection in each direction (CONNECT, PUBLISH, PUBACK, pings: all of it). A
#    subscriber on the upstream (`#`) counts the events (it decodes batches) and the PUBLISHes
#    that carried them; it is done when it has them all, linksim is stopped a second later (the
#    last PUBACKs). Edges: Waystation's forward rule plain (pipeline off), batched (json-array,
#    max_events 100, max_ms 500), batched + zstd, batched + gzip; Mosquitto 2.0's bridge
#    (`topic sensors/# out 1`). Both bridges speak MQTT 3.1.1. Bytes are counts, not timings:
#    one run each (S12A_ROUNDS=N for more). Published as fast as the edge acknowledges, every
#    batch is full (100 events); so again paced, S12P_RATE events/s per device for S12P_SECS s
#    (s12-wire-paced), where max_ms cuts the batches: what a quieter site gets.
# b) Ingest: 8 x S12B_MSGS events at QoS 1 (no subscriber) into Waystation whose bridge points
#    at a closed port (every event is on disk before its PUBACK, as in 1), with no [[pipeline]]
#    (broker waystation) and with validate + dedup = "event-v1" on sensors/+/events
#    (waystation-pipeline); ROUNDS rounds, the order rotating; /metrics says how many events
#    the pipeline passed, refused and called duplicates (all valid and new: valid = all).
#    S12B_MODES="plain validate dedup pipeline" adds a rule with only validate (and only dedup)
#    to tell their costs apart.
S12_DEVICES=8; S12A_ROUNDS=${S12A_ROUNDS:-1}; S12P_RATE=${S12P_RATE:-5}
read -r -a S12B_MODES <<<"${S12B_MODES:-plain pipeline}"
if [ "$MODE" = full ]; then S12_EVENTS=5000; S12B_MSGS=50000; S12P_SECS=15; else S12_EVENTS=1000; S12B_MSGS=5000; S12P_SECS=5; fi
# start_s12 PORT UPSTREAM_PORT HTTP_PORT MODE: Waystation with durable acks, its bridge
# forwarding sensors/# at QoS 1 with a window of 300 (as start_waystation), MODE: plain,
# json-array, zstd or gzip (the forward rule's batch keys), or pipeline (plain, and the ingest
# rule of issue 15; validate, dedup: that rule with only one of them). Sets BPID.
start_s12() {
  local port=$1 up=$2 hp=$3 mode=$4 rule="" pipe=""
  newdir "waystation-$mode"
  case "$mode" in
    json-array|zstd|gzip)
      rule=$'batch = { max_events = 100, max_ms = 500 }\nbatch_topic = "site/s12/events"\nencoding = "json-array"'
      [ "$mode" != json-array ] && rule+=$'\n'"compress = \"$mode\"" ;;
    pipeline|validate|dedup)
      pipe=$'[[pipeline]]\ntopics = "sensors/+/events"'
      [ "$mode" != dedup ] && pipe+=$'\nvalidate = "event-v1"'
      [ "$mode" != validate ] && pipe+=$'\ndedup = "event-v1"' ;;
  esac
  cat > "$DIR/waystation.toml" <<CONF
[gateway]
data_dir = "$DIR/data"
[[listener]]
bind = "127.0.0.1:$port"
[limits]
max_connection_rate = 0
[storage]
max_bytes = 4294967296
[http]
bind = "127.0.0.1:$hp"
[[bridge]]
name = "cloud"
address = "127.0.0.1:$up"
max_inflight = 300
reconnect = { initial_ms = 500, max_ms = 5000 }
[[bridge.forward]]
local = "sensors/#"
remote_prefix = ""
qos = 1
$rule
$pipe
CONF
  "$WS" run --config "$DIR/waystation.toml" 2> "$DIR/stderr.log" &
  BPID=$!
  PIDS+=("$BPID")
  for _ in $(seq 1 400); do grep -qs "listening on" "$DIR/stderr.log" && return 0; sleep 0.025; done
  echo "waystation did not start:" >&2; cat "$DIR/stderr.log" >&2; return 1
}
# A field of the one-line JSON record in FILE (empty if absent).
json_field() { grep -o "\"$2\":[0-9.e+-]*" "$1" | head -1 | cut -d: -f2 || true; }
# The sum of a Waystation /metrics family over its labels (0 if absent).
ws_metric_sum() {
  curl -s --max-time 5 "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
if want 12; then
  for r in $(seq 1 "$S12A_ROUNDS"); do
   for load in full paced; do
    if [ "$load" = full ]; then
      total=$((S12_DEVICES * S12_EVENTS)); scen=s12-wire; pace=(--messages "$S12_EVENTS")
      what="$S12_DEVICES devices x $S12_EVENTS events"
    else
      total=$((S12_DEVICES * S12P_RATE * S12P_SECS)); scen=s12-wire-paced; pace=(--rate "$S12P_RATE" --duration "$S12P_SECS")
      what="$S12_DEVICES devices x $S12P_RATE events/s for $S12P_SECS s"
    fi
    for e in mosquitto-bridge waystation waystation-batch waystation-batch-zstd waystation-batch-gzip; do
      free_port; up=$PORT; free_port; lp=$PORT; free_port; p=$PORT; free_port; hp=$PORT
      start_mosquitto "$up"; UPID=$BPID
      start_linksim "$lp" "$up"
      case "$e" in
        mosquitto-bridge) start_mosquitto "$p" "$lp" ;;
        waystation) start_s12 "$p" "$lp" "$hp" plain ;;
        waystation-batch) start_s12 "$p" "$lp" "$hp" json-array ;;
        waystation-batch-*) start_s12 "$p" "$lp" "$hp" "${e#waystation-batch-}" ;;
      esac
      EPID=$BPID
      newdir s12-upstream-sub; SUBOUT=$DIR/sub.json
      bench sub --addr "127.0.0.1:$up" --filter '#' --expect "$total" --payload-format event-v1 --idle-timeout 10 \
        --max-time 180 --client-id s12-upstream --scenario "${scen/wire/upstream}" --broker "$e" --round "$r" --out "$RES" \
        >"$SUBOUT" 2>>"$LOG" &
      SUB=$!
      sleep 0.5   # the subscriber is connected before anything can arrive
      say "s12a $e: $what, QoS 1 -> edge -> linksim -> upstream, round $r"
      bench run --addr "127.0.0.1:$p" --publishers "$S12_DEVICES" "${pace[@]}" --qos 1 --payload-format event-v1 \
        --subscribers 0 --client-prefix s12 --pid "$EPID" --scenario "${scen/wire/publish}" --broker "$e" --round "$r" \
        --out "$RES" >/dev/null 2>>"$LOG"
      wait "$SUB" || true
      sleep 1   # the last PUBACKs cross back
      extra=()
      if [ "$e" != mosquitto-bridge ]; then
        extra+=(--set "edge_forwarded=$(ws_metric_sum "$hp" waystation_bridge_forwarded_total)" \
          --set "edge_batches=$(ws_metric_sum "$hp" waystation_pipeline_batches_total)")
      fi
      stop_linksim
      events=$(json_field "$SUBOUT" unique); pubs=$(json_field "$SUBOUT" publishes)
      pbytes=$(json_field "$SUBOUT" payload_bytes)
      if [ -n "$LINK_UP" ] && [ -n "$events" ] && [ "$(echo "$events > 0" | bc -l)" = 1 ]; then
        "$WSB" record --scenario "$scen" --broker "$e" --round "$r" \
          --set "bytes_up_per_event=$(echo "$LINK_UP / $events" | bc -l)" \
          --set "bytes_down_per_event=$(echo "$LINK_DOWN / $events" | bc -l)" \
          --set "publishes_per_event=$(echo "$pubs / $events" | bc -l)" \
          --set "payload_per_event=$(echo "$pbytes / $events" | bc -l)" \
          --set "bytes_up=$LINK_UP" --set "bytes_down=$LINK_DOWN" --set "events=$events" --set "publishes=$pubs" \
          --set "lost=$((total - ${events%.*}))" --set "dup=$(json_field "$SUBOUT" dup)" \
          --set "connections=$LINK_ACCEPTED" "${extra[@]}" \
          --out "$RES" >/dev/null 2>>"$LOG"
      else
        say "s12a $e: no byte counts (linksim bytes_up '${LINK_UP:-none}', events upstream '${events:-none}')"
      fi
      stop_pid "$EPID"; stop_pid "$UPID"
    done
   done
  done
  for r in $(seq 1 "$ROUNDS"); do
    n=${#S12B_MODES[@]}
    for i in $(seq 0 $((n - 1))); do
      m=${S12B_MODES[$(((i + r) % n))]}
      b=waystation; [ "$m" != plain ] && b=waystation-$m
      free_port; p=$PORT; free_port; closed=$PORT; free_port; hp=$PORT
      start_s12 "$p" "$closed" "$hp" "$m"
      say "s12b ingest $b: 8 x $S12B_MSGS events QoS 1, round $r"
      RUNOUT=$DIR/run.json
      "$WSB" run --addr "127.0.0.1:$p" --publishers 8 --messages "$S12B_MSGS" --qos 1 --payload-format event-v1 \
        --subscribers 0 --client-prefix s12b --pid "$BPID" --scenario s12-ingest --broker "$b" --round "$r" \
        >"$RUNOUT" 2>>"$LOG" || say "FAILED (exit $?): s12b $b round $r (details in $LOG)"
      if [ -s "$RUNOUT" ]; then
        "$WSB" record --from "$RUNOUT" --scenario s12-ingest --broker "$b" --round "$r" \
          --set "valid=$(ws_metric_sum "$hp" waystation_pipeline_valid_total)" \
          --set "invalid=$(ws_metric_sum "$hp" waystation_pipeline_invalid_total)" \
          --set "duplicates=$(ws_metric_sum "$hp" waystation_pipeline_duplicates_total)" \
          --out "$RES" >/dev/null 2>>"$LOG"
      fi
      stop_pid "$BPID"
      rm -rf "$DIR/data"   # 400,000 events: ~0.3 GB each run
    done
  done
fi

# Tables.
{
  echo "Mode: $MODE, rounds: $ROUNDS (scenario 2 at 1 msg/s: $S2_ROUNDS; scenario 4: $S4_ROUNDS; idle, outage, footprint, WAN drain: 1; WAN latency: $S7_ROUNDS), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores."
  echo "Ratio: the broker's median divided by Waystation's (for msg/s higher is better; for ms and MiB lower is better)."
  echo
  T() { "$WSB" table --in "$RES" "$@"; }
  want 1 && T --scenario s1-qos1 --title "1. Fan-in, QoS 1: 8 x $S1_MSGS x 64 B, one subscriber on sensors/# (<broker>-v5: MQTT 5 publishers)" \
    --metrics "pub_rate:acked msg/s,e2e_rate:delivered msg/s,p50_ms:p50 ms,p99_ms:p99 ms,p999_ms:p99.9 ms,hwm_mib:peak RSS MiB,lost:lost:sum,dup:dup:sum"
  want 1 && T --scenario s1-qos0 --title "1. Fan-in, QoS 0: 8 x $S1_MSGS x 64 B, one subscriber on sensors/# (waystation-local: no bridge, so nothing goes to the durable log)" \
    --metrics "e2e_rate:delivered msg/s,p50_ms:p50 ms,p99_ms:p99 ms,hwm_mib:peak RSS MiB,lost:lost:sum"
  want 2 && T --scenario s2-1msgps --title "2. $S2_CLIENTS clients at 1 msg/s (QoS 1) + one subscriber, ${S2_SECS} s" \
    --metrics "p50_ms:p50 ms,p99_ms:p99 ms,p999_ms:p99.9 ms,hwm_mib:peak RSS MiB,lost:lost:sum,connect_s:connect s"
  want 2 && T --scenario s2-idle --title "2. $IDLE_CLIENTS idle clients" \
    --metrics "kib_per_conn:KiB per connection,rss_after_mib:RSS MiB,connect_rate:connects/s"
  want 2 && T --scenario s2-idle-big --title "2. $IDLE_BIG_RUN idle clients$( [ "$IDLE_BIG_RUN" != "$IDLE_BIG" ] && echo " ($IDLE_BIG asked: capped by the open files limit, $(ulimit -n) per process)")" \
    --metrics "kib_per_conn:KiB per connection,rss_after_mib:RSS MiB,connect_rate:connects/s,sources:source addresses"
  want 2 && T --scenario s2-idle-sub --title "2. $IDLE_CLIENTS idle clients, each subscribed to its own devices/<i>/cmd" \
    --metrics "kib_per_conn:KiB per connection,rss_after_mib:RSS MiB,connect_rate:connects/s"
  want 3 && T --scenario s3-bridge --title "3. Edge to cloud: 8 x $S3_MSGS QoS 1 -> edge -> upstream Mosquitto -> subscriber" \
    --metrics "pub_rate:edge acked msg/s,e2e_rate:upstream delivered msg/s,p50_ms:p50 ms,p99_ms:p99 ms,hwm_mib:edge peak RSS MiB,lost:lost:sum,dup:dup:sum"
  want 3 && T --scenario s3-outage --title "3. Edge to cloud at 8 x $S3_RATE msg/s for $S3_SECS s, upstream stopped for $S3_DOWN_FOR s" \
    --metrics "acked:acked by edge,unique:delivered upstream,lost:lost,dup:duplicates,p99_ms:p99 ms,max_ms:max ms"
  want 4 && T --scenario s4-buffer --title "4. Backlog: $S4_TOTAL QoS 1 messages published while the upstream is down" \
    --metrics "pub_rate:acked msg/s,rss_max_mib:peak RSS MiB"
  want 4 && T --scenario s4-waiting --title "4. Backlog waiting ($S4_TOTAL messages)" \
    --metrics "rss_waiting_mib:RSS MiB,hwm_mib:peak RSS MiB,store_disk_mib:store on disk MiB"
  want 4 && T --scenario s4-drain-mosquitto --title "4. Drain of $S4_TOTAL into upstream Mosquitto" \
    --metrics "drain_rate:msg/s,drain_s:seconds,unique:delivered,dup:dup,rss_max_mib:edge RSS MiB during drain"
  want 4 && T --scenario s4-drain-rumqttd --title "4. Drain of $S4_TOTAL into upstream rumqttd" \
    --metrics "drain_rate:msg/s,drain_s:seconds,unique:delivered,dup:dup,rss_max_mib:edge RSS MiB during drain"
  want 4 && T --scenario s4-ceiling-mosquitto --baseline mosquitto --title "4. Upstream ceiling: one QoS 1 publisher into Mosquitto ($S4_CEIL)" \
    --metrics "pub_rate:acked msg/s,e2e_rate:delivered msg/s"
  want 4 && T --scenario s4-ceiling-rumqttd --baseline rumqttd --title "4. Upstream ceiling: one QoS 1 publisher into rumqttd ($S4_CEIL)" \
    --metrics "pub_rate:acked msg/s,e2e_rate:delivered msg/s"
  want 5 && T --scenario s5-idle --title "5. Idle footprint (no clients)" \
    --metrics "rss_idle_mib:RSS MiB,binary_mib:binary MiB"
  if want 6; then
    echo "### 6. Edge RSS against the backlog (upstream down, +$S6_STEP x 64 B QoS 1 per step)"
    echo
    echo "| waiting | VmRSS MiB | store on disk MiB |"
    echo "|---|---|---|"
    echo "$S6_ROWS"
    echo
  fi
  want 7 && T --scenario s7-buffer --title "7. WAN link: backlog of $S7_DRAIN QoS 1 messages published while the link is down" \
    --metrics "pub_rate:acked msg/s,rss_max_mib:edge peak RSS MiB"
  want 7 && T --scenario s7-drain --title "7. WAN link: drain of $S7_DRAIN over $S7_DRAIN_MS ms each way into upstream Mosquitto, bridge window $S7_INFLIGHT (Mosquitto 2.0.11 does not hold it; waystation-w: window $S7_WIDE)" \
    --metrics "drain_rate:msg/s,drain_s:seconds,unique:delivered,lost:lost:sum,dup:dup:sum,rss_max_mib:edge RSS MiB during drain"
  want 7 && T --scenario s7-wire --title "7. WAN link: bytes on the wire per message delivered in that drain (counted by linksim)" \
    --metrics "bytes_up_per_msg:edge->upstream B/msg,bytes_down_per_msg:upstream->edge B/msg,connections:link connections:sum"
  want 7 && T --scenario s7-latency-loopback --title "7. Forwarding latency, 4 x 250 msg/s QoS 1 64 B for $S7_LAT_SECS s, edge -> upstream over loopback" \
    --metrics "p50_ms:p50 ms,p99_ms:p99 ms,p999_ms:p99.9 ms,max_ms:max ms,unique:delivered,lost:lost:sum,dup:dup:sum"
  want 7 && T --scenario "s7-latency-wan$S7_LAT_MS" --title "7. Forwarding latency, 4 x 250 msg/s QoS 1 64 B for $S7_LAT_SECS s, edge -> upstream over $S7_LAT_MS ms each way" \
    --metrics "p50_ms:p50 ms,p99_ms:p99 ms,p999_ms:p99.9 ms,max_ms:max ms,unique:delivered,lost:lost:sum,dup:dup:sum"
  want 8 && T --scenario s8-flood --title "8. QoS 0 flood: $S8_PUBS x $S8_PER x 64 B to a forwarded topic, upstream frozen (Mosquitto: persistence on, its own bridge)" \
    --metrics "pub_rate:flooder msg/s,rss_max_mib:peak RSS MiB (sampled)"
  want 8 && T --scenario s8-memory --title "8. QoS 0 flood: the edge's memory, and Waystation's ingest" \
    --metrics "hwm_mib:VmHWM MiB,rss_after_mib:RSS MiB 2 s after,ingest_rate:ingested msg/s,ingest_pauses:ingest pauses"
  want 9 && T --scenario s9-large --title "9. Large messages: 1 publisher x $S9_MSGS x 1 MiB QoS 1 (window $S9_INFLIGHT), one subscriber" \
    --metrics "pub_mib_s:acked MiB/s,e2e_mib_s:delivered MiB/s,p50_ms:p50 ms,p99_ms:p99 ms,hwm_mib:peak RSS MiB,lost:lost:sum,dup:dup:sum"
  if want 10; then
    T --scenario s10-saturation --title "10. Saturation: 8 x $S10_SAT QoS 1 x 64 B closed loop, one subscriber (Waystation: fsync before PUBACK; Mosquitto: persistence on); the loads below are percentages of the delivered rate" \
      --metrics "pub_rate:acked msg/s,e2e_rate:delivered msg/s,p99_ms:p99 ms"
    for pct in $S10_LOADS; do
      T --scenario "s10-open-$pct" --title "10. Open loop at $pct% of each broker's own saturation (delivered msg/s), 8 publishers QoS 1 64 B, ${S10_SECS} s (latency from the scheduled send)" \
        --metrics "target_rate:offered msg/s,pub_rate:acked msg/s,p50_ms:pub->sub p50 ms,p99_ms:pub->sub p99 ms,p999_ms:pub->sub p99.9 ms,ack_p50_ms:PUBACK p50 ms,ack_p99_ms:PUBACK p99 ms,commit_sync_ms:mean fsync ms,commit_batch:mean batch,lost:lost:sum"
    done
  fi
  want 11 && T --scenario s11-keepup --title "11a. QoS 0 fan-in, 8 x 64 B at $S11_RATE msg/s in bursts of $S11_BURST per publisher, ${S11_SECS} s; the subscriber reads at twice the average" \
    --metrics "target_rate:offered msg/s,pub_rate:achieved msg/s,unique:delivered,lost:lost:sum,p99_ms:p99 ms,rss_max_mib:peak RSS MiB"
  want 11 && T --scenario s11-behind --title "11b. QoS 0 fan-in, 8 x 64 B at $S11_RATE msg/s, ${S11_SECS} s; the subscriber reads at a tenth of that (full speed once publishers are done)" \
    --metrics "target_rate:offered msg/s,pub_rate:achieved msg/s,unique:delivered,lost:lost:sum,dropped_slow:dropped (slow client):sum,ingest_pauses:ingest pauses,rss_max_mib:peak RSS MiB"
  want 12 && T --scenario s12-wire --baseline mosquitto-bridge --title "12a. Upstream wire per firmware event: $S12_DEVICES devices x $S12_EVENTS events QoS 1 -> edge -> linksim -> upstream Mosquitto (batch: json-array, max_events 100, max_ms 500); ratio: to Mosquitto's bridge" \
    --metrics "bytes_up_per_event:B up per event,bytes_down_per_event:B down per event,publishes_per_event:upstream PUBLISHes per event,payload_per_event:payload B per event,events:events upstream:sum,lost:lost:sum,dup:dup:sum,edge_forwarded:acked upstream (edge's count):sum,edge_batches:batches (edge's count):sum"
  want 12 && T --scenario s12-wire-paced --baseline mosquitto-bridge --title "12a. The same, paced: $S12_DEVICES devices x $S12P_RATE events/s for $S12P_SECS s (max_ms 500 cuts the batches)" \
    --metrics "bytes_up_per_event:B up per event,bytes_down_per_event:B down per event,publishes_per_event:upstream PUBLISHes per event,payload_per_event:payload B per event,events:events upstream:sum,lost:lost:sum,dup:dup:sum"
  want 12 && T --scenario s12-upstream --baseline mosquitto-bridge --title "12a. What the upstream's subscriber got (events decoded from batches)" \
    --metrics "unique:events,dup:duplicates:sum,lost:lost:sum,publishes:PUBLISHes,payload_bytes:payload bytes,stray:undecodable:sum"
  want 12 && T --scenario s12-ingest --title "12b. Ingest: 8 x $S12B_MSGS firmware events QoS 1 into Waystation (fsync before PUBACK), no [[pipeline]] (waystation) vs validate + dedup event-v1 (waystation-pipeline); ratio: to no pipeline" \
    --metrics "pub_rate:acked msg/s,payload:payload B,valid:passed the pipeline,invalid:refused:sum,duplicates:duplicates:sum,hwm_mib:peak RSS MiB"
} > "$OUT/tables.md"
cat "$OUT/tables.md"
say "done: $OUT/tables.md"
