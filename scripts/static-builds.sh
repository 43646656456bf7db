#!/usr/bin/env bash
# The daemon for Linux machines with no particular C library: x86_64, aarch64 and armv7
# (32-bit Raspberry Pi OS) statically linked with musl, cross-built with zig as the C compiler
# (for ring) and linker (cargo-zigbuild). Prints each stripped binary's size and leaves them,
# named by Debian architecture, in target/dist/:
#   waystation-amd64  waystation-arm64  waystation-armhf
#
# Usage: scripts/static-builds.sh [--demo] [TARGET...]
#   --demo   with `waystation demo` (rumqttd and the simulator; larger). Default: without.
#   TARGET   rust targets (default: the three above). A gnu target may end in .GLIBC_VERSION
#            (armv7-unknown-linux-gnueabihf.2.17: a glibc build for 32-bit ARM).
#
# Installs what is missing: the rustup targets, zig from PyPI (ziglang) and cargo-zigbuild
# from crates.io, both pinned. Where rustup has no standard library for a target (the
# toolchain mirror CI uses publishes none for 32-bit ARM musl), the standard library is built
# from rustup's `rust-src` (-Zbuild-std, allowed on stable by RUSTC_BOOTSTRAP=1 for this
# build only) and zig supplies musl's start files and libc. Release builds; zig's linker
# leaves no symbol table (`file` says "stripped"), which the script checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ZIG_VERSION=0.15.2
ZIGBUILD_VERSION=0.24.1

features=(--no-default-features)
targets=()
for a in "$@"; do
  case "$a" in
    --demo) features=() ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "unknown option: $a" >&2; exit 2 ;;
    *) targets+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)

target_dir="${CARGO_TARGET_DIR:-target}"
# zig: cargo-zigbuild runs `python3 -m ziglang` when no zig is on the PATH. Installed with
# --target into the target dir: pinned, and allowed where the system Python is "externally
# managed" (PEP 668, Debian 12's python3).
if ! command -v zig >/dev/null; then
  case "$target_dir" in /*) tools=$target_dir ;; *) tools=$(pwd)/$target_dir ;; esac
  tools="$tools/tools/ziglang-$ZIG_VERSION"
  export PYTHONPATH="$tools${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "installing ziglang==$ZIG_VERSION from PyPI into $tools"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --target "$tools" "ziglang==$ZIG_VERSION" || {
      echo "cannot install zig (python3 -m pip install ziglang==$ZIG_VERSION; Debian: apt-get install python3-pip)" >&2; exit 1; }
  fi
fi
if ! cargo zigbuild --help >/dev/null 2>&1; then
  echo "installing cargo-zigbuild $ZIGBUILD_VERSION from crates.io"
  cargo install --locked --quiet --version "$ZIGBUILD_VERSION" cargo-zigbuild
fi

dist="$target_dir/dist"
mkdir -p "$dist"
summary=()
for t in "${targets[@]}"; do
  triple=${t%%.[0-9]*}          # without a .GLIBC_VERSION suffix
  case "$triple" in
    x86_64-*) arch=amd64; elf="x86-64" ;;
    aarch64-*) arch=arm64; elf="ARM aarch64" ;;
    armv7-*|arm-*) arch=armhf; elf="ARM, EABI5" ;;
    *) echo "no Debian architecture known for $triple" >&2; exit 2 ;;
  esac
  start=$SECONDS
  build_std=()
  if ! rustup target list --installed | grep -qx "$triple" && ! rustup target add "$triple" >/dev/null 2>&1; then
    # No prebuilt standard library: build it from source, with the same compiler. Only the
    # standard library's crates come from source; everything else is as for any target.
    rustup component add rust-src >/dev/null 2>&1 || {
      echo "rustup has neither the standard library for $triple nor rust-src to build it" >&2; exit 1; }
    echo "$triple: no prebuilt standard library from rustup; building it from rust-src"
    build_std=(-Zbuild-std=std,panic_abort)
  fi
  if [ ${#build_std[@]} -gt 0 ]; then
    # rustc would link its own copies of musl's crt1.o/libc.a, which a rust-src build does not
    # have; zig's are the same musl, so let the linker (zig) bring them.
    flags_var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    env RUSTC_BOOTSTRAP=1 "$flags_var=-C link-self-contained=no" \
      cargo zigbuild --release -p waystation --target "$t" "${features[@]}" "${build_std[@]}"
  else
    cargo zigbuild --release -p waystation --target "$t" "${features[@]}"
  fi
  bin="$target_dir/$triple/release/waystation"
  out="$dist/waystation-$arch"
  cp "$bin" "$out"
  desc=$(file -b "$out")
  if [[ "$desc" != *"$elf"* ]]; then
    echo "$out is not a $elf binary: $desc" >&2; exit 1
  fi
  if [[ "$desc" != *", stripped"* ]]; then
    echo "$out still has its symbols: $desc" >&2; exit 1
  fi
  case "$triple" in
    *-musl*)
      if [[ "$desc" != *"statically linked"* && "$desc" != *"static-pie linked"* ]]; then
        echo "$out is not static: $desc" >&2; exit 1
      fi
      libc="static (musl)" ;;
    *-gnu*)
      # The newest glibc symbol version it needs: what the oldest OS it starts on must have.
      newest=$(readelf --dyn-syms -W "$out" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
      want=${t#"$triple"}; want=${want#.}
      if [ -n "$want" ] && [ "$(printf '%s\n%s\n' "GLIBC_$want" "$newest" | sort -V | tail -1)" != "GLIBC_$want" ]; then
        echo "$out needs $newest, more than the glibc $want asked for" >&2; exit 1
      fi
      libc="dynamic, glibc >= ${newest#GLIBC_}" ;;
  esac
  size=$(stat -c %s "$out")
  summary+=("$(printf '%-40s %-6s %6d KiB  %s  (%ds)' "$t" "$arch" $((size / 1024)) "$libc" $((SECONDS - start)))")
done
echo "waystation ${features[*]:-(with demo)}, stripped, in $dist:"
printf '  %s\n' "${summary[@]}"
