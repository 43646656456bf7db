#!/usr/bin/env bash
# Runs the Raspberry Pi binaries under qemu-user, as a Pi's CPU: arm64 as a Cortex-A53 (Pi 3),
# armhf as a Cortex-A7 (Pi 2). For each: check-config (a good config 0, a bad one 2), `run`
# with a bad config (2, so that the unit does not restart it), then `run` and, with
# mosquitto_pub/mosquitto_sub over 127.0.0.1, QoS 1 delivery to a persistent session, a
# backlog of messages for it while it is away, SIGTERM (exit 0), a restart, and every message
# of the backlog delivered after the restart. Also /healthz and /metrics.
#
# Usage: scripts/arm-smoke.sh [ARCH...]     ARCH: arm64, armhf, amd64 (default: arm64 armhf)
# Binaries: target/dist/waystation-ARCH (scripts/static-builds.sh), static: qemu runs them with no
# target C library, so a binary that needs one fails here (a glibc build: set QEMU_LD_PREFIX).
# Needs qemu-user (Debian), mosquitto-clients, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${CARGO_TARGET_DIR:-target}/dist"
BACKLOG=${SMOKE_BACKLOG:-300}
arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(arm64 armhf)

work=$(mktemp -d)
daemon=""
cleanup() {
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then kill -KILL "$daemon" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "arm-smoke [$arch]: FAIL: $*" >&2; [ -f "$work/log" ] && tail -20 "$work/log" >&2; exit 1; }

# wait_for PATTERN FILE SECONDS: the first line of FILE matching PATTERN, within SECONDS.
wait_for() {
  local deadline=$((SECONDS + $3))
  while [ $SECONDS -lt $deadline ]; do
    if grep -m1 -E "$1" "$2" 2>/dev/null; then return 0; fi
    kill -0 "$daemon" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

# start: runs the daemon in the background; sets $daemon, $port (MQTT) and $http (host:port).
start() {
  : > "$work/log"
  "${runner[@]}" "$bin" run --config "$work/ok.toml" 2> "$work/log" &
  daemon=$!
  local line
  line=$(wait_for 'listening on 127\.0\.0\.1:[0-9]+' "$work/log" 60) || fail "no 'listening on' within 60 s"
  port=$(sed -E 's/.*listening on 127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
  line=$(wait_for 'at http://127\.0\.0\.1:[0-9]+/' "$work/log" 30) || fail "no HTTP server within 30 s"
  http=$(sed -E 's|.*at http://(127\.0\.0\.1:[0-9]+)/.*|\1|' <<<"$line")
}

# stop: SIGTERM, and the daemon must exit 0 within 30 s.
stop() {
  kill -TERM "$daemon"
  local deadline=$((SECONDS + 30))
  while kill -0 "$daemon" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -0 "$daemon" 2>/dev/null && fail "still running 30 s after SIGTERM"
  local rc=0
  wait "$daemon" || rc=$?
  daemon=""
  [ "$rc" = 0 ] || fail "exit $rc after SIGTERM (want 0)"
}

get() { python3 -c 'import sys,urllib.request; print(urllib.request.urlopen("http://"+sys.argv[1], timeout=10).read().decode())' "$1"; }

# receive N: the queued messages for the persistent session "keeper", in order.
receive() {
  timeout 90 mosquitto_sub -p "$port" -i keeper -c -q 1 -t 'smoke/#' -C "$1" -W 60 > "$work/got" ||
    fail "keeper got $(wc -l < "$work/got") of $1 messages"
  seq "$2" "$3" | sed 's/^/m/' > "$work/want"
  cmp -s "$work/got" "$work/want" || fail "keeper's messages differ from m$2..m$3: $(diff "$work/want" "$work/got" | head -5)"
}

for arch in "${arches[@]}"; do
  bin="$dist/waystation-$arch"
  [ -x "$bin" ] || fail "no $bin (scripts/static-builds.sh builds it)"
  case "$arch" in
    arm64) runner=(qemu-aarch64 -cpu cortex-a53) ;;
    armhf) runner=(qemu-arm -cpu cortex-a7) ;;
    amd64) runner=() ;;
    *) fail "unknown architecture" ;;
  esac
  [ ${#runner[@]} -eq 0 ] || command -v "${runner[0]}" >/dev/null || fail "no ${runner[0]} (apt-get install qemu-user)"
  started=$SECONDS
  rm -rf "$work/data"
  cat > "$work/ok.toml" <<EOF
[gateway]
data_dir = "$work/data"
sys_interval = 0
[[listener]]
bind = "127.0.0.1:0"
[http]
bind = "127.0.0.1:0"
EOF
  printf '[gateway]\ndata_dir = "%s"\n[limits]\nmax_inflight = "many"\n' "$work/data" > "$work/bad.toml"

  out=$("${runner[@]}" "$bin" --version) || fail "--version"
  "${runner[@]}" "$bin" check-config --config "$work/ok.toml" > /dev/null || fail "check-config of a good config"
  rc=0; "${runner[@]}" "$bin" check-config --config "$work/bad.toml" 2> "$work/err" || rc=$?
  [ "$rc" = 2 ] || fail "check-config of a bad config: exit $rc (want 2)"
  grep -q max_inflight "$work/err" || fail "check-config's error does not name the key: $(cat "$work/err")"
  rc=0; timeout 60 "${runner[@]}" "$bin" run --config "$work/bad.toml" 2> "$work/err" || rc=$?
  [ "$rc" = 2 ] || fail "run with a bad config: exit $rc (want 2, the unit's RestartPreventExitStatus)"

  start
  # A persistent session subscribes, leaves; 20 QoS 1 messages wait for it, then arrive.
  timeout 60 mosquitto_sub -p "$port" -i keeper -c -q 1 -t 'smoke/#' -E || fail "subscribe"
  seq 1 20 | sed 's/^/m/' | timeout 60 mosquitto_pub -p "$port" -i pub1 -q 1 -t smoke/a -l || fail "publish 20"
  receive 20 1 20
  # A backlog for the session, the daemon stopped and started again: all of it, in order.
  seq 21 $((20 + BACKLOG)) | sed 's/^/m/' | timeout 120 mosquitto_pub -p "$port" -i pub2 -q 1 -t smoke/b -l ||
    fail "publish $BACKLOG"
  get "$http/healthz" > /dev/null || fail "/healthz"
  metrics=$(get "$http/metrics") || fail "/metrics"
  grep -q '^waystation_' <<<"$metrics" || fail "/metrics has no waystation_ series"
  stop
  start
  receive "$BACKLOG" 21 $((20 + BACKLOG))
  stop
  echo "arm-smoke [$arch]: ok in $((SECONDS - started)) s: ${out}; check-config 0/2, run with a bad config 2, 20 QoS 1 messages to a persistent session, $BACKLOG waiting across SIGTERM (exit 0) and restart all delivered in order, /healthz, /metrics (${runner[*]:-native})"
done
