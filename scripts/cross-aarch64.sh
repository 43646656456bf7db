#!/usr/bin/env bash
# Cross-builds the daemon for a Raspberry Pi 3/4/5 with a 64-bit OS (aarch64-unknown-linux-gnu)
# using Debian's gcc-aarch64-linux-gnu as the linker, and reports the stripped binary size.
# Usage: scripts/cross-aarch64.sh [--no-demo]   (--no-demo: without the demo's rumqttd & sim)
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
features=()
[ "${1:-}" = "--no-demo" ] && features=(--no-default-features)

if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  else
    echo "missing: gcc-aarch64-linux-gnu (sudo apt-get install gcc-aarch64-linux-gnu)" >&2
    exit 1
  fi
fi
rustup target add "$target" >/dev/null

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
cargo build --release -p waystation --target "$target" "${features[@]}"
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/$target/release/waystation"
out="$target_dir/$target/release/waystation.stripped"
aarch64-linux-gnu-strip -o "$out" "$bin"
if command -v file >/dev/null && ! file "$out" | grep -q "aarch64"; then
  echo "not an aarch64 binary: $(file "$out")" >&2
  exit 1
fi
size=$(stat -c %s "$out")
echo "aarch64 waystation ${features[*]:-(with demo)}: $out, stripped $((size / 1024)) KiB ($size bytes)"
