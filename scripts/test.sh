#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null && [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v qemu-system-arm >/dev/null || need_apt+=(qemu-system-arm)
command -v arm-none-eabi-size >/dev/null || need_apt+=(binutils-arm-none-eabi)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v python3 >/dev/null || need_apt+=(python3)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v mosquitto_passwd >/dev/null || need_apt+=(mosquitto)
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
# The MQTT 5 suites (tests/tests/broker_v5*.rs) drive paho-mqtt (Python, in a venv) and
# MQTT.js (Node): Debian's python3 has no ensurepip without python3-venv.
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
command -v qemu-aarch64 >/dev/null && command -v qemu-arm >/dev/null || need_apt+=(qemu-user)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
command -v file >/dev/null || need_apt+=(file)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  else
    echo "missing packages: ${need_apt[*]} (run as root or: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi
# The broker package starts a system mosquitto on port 1883; tests start their own on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi

# MQTT 5 client libraries, pinned, inside the repository (both directories gitignored):
# paho-mqtt in a venv (PEP 668 forbids pip into the system Python) and MQTT.js from the
# committed package-lock.json. Reinstalled only when missing or not the pinned version.
clients=tests/clients
if ! "$clients/.venv/bin/python" -c 'import sys, paho.mqtt; sys.exit(paho.mqtt.__version__ != "2.1.0")' 2>/dev/null; then
  python3 -m venv --clear "$clients/.venv"
  "$clients/.venv/bin/python" -m pip install --quiet --disable-pip-version-check 'paho-mqtt==2.1.0'
fi
if ! (cd "$clients" && npm ls --depth=0 >/dev/null 2>&1); then
  (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error)
fi

rustup target add thumbv7em-none-eabihf thumbv7m-none-eabi riscv32imc-unknown-none-elf >/dev/null

# The layout first (a second, no build): no import circle between the modules of the broker,
# the gateway and the bench, no non-test file over 600 lines nor function over 120.
python3 scripts/layout.py self-test
python3 scripts/layout.py

# The end-to-end tests start the real daemon binary.
cargo build --workspace --bins
results=$(mktemp)
trap 'rm -f "$results"' EXIT
cargo test --workspace --no-fail-fast 2>&1 | tee "$results"

# Firmware: cross-builds (Cortex-M4F, RISC-V) and the size budget (flash added vs the
# baseline board, RAM = static + painted stack measured in QEMU).
bash scripts/firmware-size.sh

# The daemon for a Raspberry Pi (issue 16): static (musl) x86_64, aarch64 and armv7 binaries
# built with zig, and their sizes; the ARM ones run under qemu-user as a
# Cortex-A53 and a Cortex-A7 (QoS 1, a backlog across SIGTERM and restart); a .deb per
# architecture, the amd64 one installed into a fresh Debian root and checked (user, modes,
# systemd-analyze verify, passwords, TLS, upgrade, purge). Each step says what it cost.
for step in static-builds package-deb arm-smoke deb-check; do
  t=$SECONDS
  bash "scripts/$step.sh"
  echo "$step: $((SECONDS - t)) s"
done

# Fuzzing, bounded: each cargo-fuzz target for 45 s from the committed corpus; any crash fails.
bash scripts/fuzz.sh 45

# One closing line for the whole run (cargo's own last line is a doc-test summary).
passed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($i ~ /^passed;?$/) s+=$(i-1)} END{print s+0}' "$results")
failed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($i ~ /^failed;?$/) s+=$(i-1)} END{print s+0}' "$results")
echo "tests: $passed passed, $failed failed"
