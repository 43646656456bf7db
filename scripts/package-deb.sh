#!/usr/bin/env bash
# One .deb per architecture from the binaries scripts/static-builds.sh leaves in target/dist/:
#   target/dist/waystation_<version>_<arch>.deb
# The binary (/usr/bin/waystation), the default config (/etc/waystation/waystation.toml, a
# conffile: an edited one is kept on upgrade), the systemd unit, the docs and the SSD drop-in
# example; postinst creates the waystation system user, /etc/waystation root:waystation 0750
# and /var/lib/waystation waystation:waystation 0750, and enables the unit (config/deb/).
#
# Usage: scripts/package-deb.sh [ARCH...]   (default: amd64 arm64 armhf; needs dpkg-deb)
# DEB_VERSION overrides the version (default: gateway/Cargo.toml's, revision -1).
#
# dpkg-deb rather than cargo-deb: no extra tool to compile in CI (cargo-deb is a few minutes
# of build on 2 cores), and the binaries come from cargo-zigbuild, not a cargo build of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${CARGO_TARGET_DIR:-target}/dist"
arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64 armhf)
version=${DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' gateway/Cargo.toml | head -1)-1}
command -v dpkg-deb >/dev/null || { echo "missing: dpkg-deb (Debian's dpkg)" >&2; exit 1; }

for arch in "${arches[@]}"; do
  bin="$dist/waystation-$arch"
  [ -x "$bin" ] || { echo "no $bin: run scripts/static-builds.sh first" >&2; exit 1; }
  # The default builds are static (musl) and need nothing; a glibc build
  # (static-builds.sh armv7-unknown-linux-gnueabihf.2.17) needs the glibc its newest symbol names.
  depends=""
  newest=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
  [ -z "$newest" ] || depends="libc6 (>= ${newest#GLIBC_})"

  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  chmod 0755 "$root"   # mktemp's 0700 would be the package's "./" entry
  install -D -m 0755 "$bin" "$root/usr/bin/waystation"
  install -D -m 0644 config/waystation.toml "$root/etc/waystation/waystation.toml"
  install -D -m 0644 config/waystation.service "$root/lib/systemd/system/waystation.service"
  doc="$root/usr/share/doc/waystation"
  install -D -m 0644 README.md "$doc/README.md"
  install -m 0644 docs/raspberry-pi.md docs/security.md "$doc/"
  install -D -m 0644 config/deb/data-dir.conf "$doc/examples/data-dir.conf"
  printf '%s\n' "Waystation, an MQTT edge gateway." "License: Apache-2.0" \
    "On Debian systems the full text of the license is in /usr/share/common-licenses/Apache-2.0." \
    > "$doc/copyright"
  chmod 0644 "$doc/copyright"
  mkdir -p "$root/DEBIAN"
  install -m 0755 config/deb/postinst config/deb/prerm config/deb/postrm "$root/DEBIAN/"
  echo /etc/waystation/waystation.toml > "$root/DEBIAN/conffiles"
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: waystation"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: Waystation developers <maintainers@waystation.invalid>"
    echo "Installed-Size: $size"
    [ -z "$depends" ] || echo "Depends: $depends"
    echo "Section: net"
    echo "Priority: optional"
    echo "Description: MQTT edge gateway: keeps sensor events on disk and forwards them upstream"
    echo " An MQTT 3.1.1 and 5 broker for the devices of a site that acknowledges a QoS 1 message"
    echo " only once it is on disk, and bridges to cloud brokers through outages and restarts."
    echo " Runs as the waystation user under systemd; config in /etc/waystation."
  } > "$root/DEBIAN/control"
  out="$dist/waystation_${version}_${arch}.deb"
  # --root-owner-group: every file root:root whoever builds it; xz is what every dpkg reads.
  dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
  rm -rf "$root"
  trap - EXIT
  echo "$out: $(($(stat -c %s "$out") / 1024)) KiB${depends:+, Depends: $depends}"
done
