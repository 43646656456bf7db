#!/usr/bin/env bash
# Installs the amd64 .deb into a fresh Debian 12 root (debootstrap, minbase + systemd) and
# checks it as a Pi owner would meet it: files, conffiles, the waystation user, owners and
# modes, the unit enabled and passing `systemd-analyze verify`; `waystation passwd` and a TLS
# key made as root are readable by the daemon's user; the daemon runs as that user (QoS 1 with
# a password, over TLS too), SIGTERM exits 0; an upgrade keeps an edited config; purge removes
# the store. The arm64 and armhf packages must hold the same files.
#
# Usage (root): scripts/deb-check.sh   after scripts/static-builds.sh and scripts/package-deb.sh
# The base system is cached in target/deb-check/rootfs.tar (DEB_CHECK_MIRROR: the Debian mirror,
# default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${CARGO_TARGET_DIR:-target}/dist"
cache="${CARGO_TARGET_DIR:-target}/deb-check"
mirror=${DEB_CHECK_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "deb-check: needs root (chroot, dpkg)" >&2; exit 1; }
for c in debootstrap systemd-analyze mosquitto_pub openssl; do
  command -v "$c" >/dev/null || { echo "deb-check: missing $c" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' gateway/Cargo.toml | head -1)-1
deb() { echo "$dist/waystation_${1}_${2}.deb"; }
[ -f "$(deb "$version" amd64)" ] || { echo "deb-check: no $(deb "$version" amd64) (scripts/package-deb.sh)" >&2; exit 1; }

fail() { echo "deb-check: FAIL: $*" >&2; exit 1; }
check() { # check WHAT ACTUAL EXPECTED
  [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
}

mkdir -p "$cache"
if [ ! -f "$cache/rootfs.tar" ]; then
  start=$SECONDS
  rm -rf "$cache/build"
  debootstrap --variant=minbase --include=systemd bookworm "$cache/build" "$mirror" > "$cache/debootstrap.log" 2>&1 ||
    { tail -20 "$cache/debootstrap.log" >&2; fail "debootstrap (log: $cache/debootstrap.log)"; }
  tar -C "$cache/build" -cf "$cache/rootfs.tar" .
  rm -rf "$cache/build"
  echo "deb-check: Debian 12 minbase + systemd root made in $((SECONDS - start)) s"
fi
R=$(mktemp -d "$cache/root.XXXXXX")
daemon=""
cleanup() {
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then kill -KILL "$daemon" 2>/dev/null || true; fi
  rm -rf "$R"
}
trap cleanup EXIT
tar -C "$R" -xf "$cache/rootfs.tar"
in_root() { chroot "$R" "$@"; }
as_daemon() { chroot "$R" setpriv --reuid=waystation --regid=waystation --init-groups "$@"; }

# --- install ---
cp "$(deb "$version" amd64)" "$R/tmp/ws.deb"
in_root dpkg -i /tmp/ws.deb > "$cache/install.log" 2>&1 || { cat "$cache/install.log" >&2; fail "dpkg -i"; }
files=$(in_root dpkg -L waystation | sort)
for f in /usr/bin/waystation /etc/waystation/waystation.toml /lib/systemd/system/waystation.service \
  /usr/share/doc/waystation/README.md /usr/share/doc/waystation/raspberry-pi.md \
  /usr/share/doc/waystation/examples/data-dir.conf /usr/share/doc/waystation/copyright; do
  grep -qx "$f" <<<"$files" || fail "the package does not hold $f"
done
conffiles=$(in_root dpkg-query -W -f='${Conffiles}' waystation | awk 'NF {print $1}')
check conffiles "$conffiles" /etc/waystation/waystation.toml

# --- the user and what it owns ---
IFS=: read -r _ _ uid gid _ home shell < <(in_root getent passwd waystation) || fail "no waystation user"
[ "$uid" -lt 1000 ] || fail "waystation is not a system user (uid $uid)"
check "waystation's home" "$home" /var/lib/waystation
check "waystation's shell" "$shell" /usr/sbin/nologin
check "waystation's group" "$(in_root getent group waystation | cut -d: -f3)" "$gid"
st() { in_root stat -c '%U:%G %a' "$1"; }
check /usr/bin/waystation "$(st /usr/bin/waystation)" "root:root 755"
check /etc/waystation "$(st /etc/waystation)" "root:waystation 750"
check /etc/waystation/waystation.toml "$(st /etc/waystation/waystation.toml)" "root:root 644"
check /var/lib/waystation "$(st /var/lib/waystation)" "waystation:waystation 750"
check "the unit file" "$(st /lib/systemd/system/waystation.service)" "root:root 644"
[ -L "$R/etc/systemd/system/multi-user.target.wants/waystation.service" ] || fail "the unit is not enabled"
verify=$(in_root systemd-analyze verify --man=no /lib/systemd/system/waystation.service 2>&1) ||
  fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
check "check-config of the default config, as waystation" \
  "$(as_daemon waystation check-config --config /etc/waystation/waystation.toml)" "/etc/waystation/waystation.toml: OK"

# --- passwords and a TLS key made by root, read by the daemon's user ---
echo 's3cret' | in_root waystation passwd /etc/waystation/passwd alice || fail "waystation passwd"
check "a new password file" "$(st /etc/waystation/passwd)" "root:waystation 640"
echo 'other' | in_root waystation passwd /etc/waystation/passwd bob || fail "waystation passwd (second user)"
check "the password file after a second user" "$(st /etc/waystation/passwd)" "root:waystation 640"
tls=$(mktemp -d)
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -keyout "$tls/key" -out "$tls/crt" 2>/dev/null
cp "$tls/key" "$tls/crt" "$R/tmp/"
rm -rf "$tls"
# As docs/raspberry-pi.md says to install them.
in_root install -m 0640 -g waystation /tmp/key /etc/waystation/server.key
in_root install -m 0644 /tmp/crt /etc/waystation/server.crt
# The edited config (an upgrade must keep it): free ports, passwords, a TLS listener.
cat >> "$R/etc/waystation/waystation.toml" <<'EOF'
# edited by deb-check
[[listener]]
bind = "127.0.0.1:0"
tls = { cert = "/etc/waystation/server.crt", key = "/etc/waystation/server.key" }
EOF
sed -i 's|^bind = "127.0.0.1:1883"|bind = "127.0.0.1:0"|; s|^bind = "127.0.0.1:8080"|bind = "127.0.0.1:0"|; s|^# password_file = "/etc/waystation/passwd"|password_file = "/etc/waystation/passwd"|' \
  "$R/etc/waystation/waystation.toml"
check "check-config with passwords and TLS, as waystation" \
  "$(as_daemon waystation check-config --config /etc/waystation/waystation.toml 2>&1)" "/etc/waystation/waystation.toml: OK"
# The check above must be able to fail: a key only root can read is refused.
in_root chmod 0600 /etc/waystation/server.key
rc=0; as_daemon waystation check-config --config /etc/waystation/waystation.toml >/dev/null 2>&1 || rc=$?
check "check-config as waystation with a key it cannot read (exit)" "$rc" 2
in_root chmod 0640 /etc/waystation/server.key

# --- the daemon as its user: store in /var/lib/waystation, passwords, TLS, SIGTERM ---
log="$cache/daemon.log"
# chroot and setpriv exec the daemon: $! is its pid (a shell function would put a subshell there).
chroot "$R" setpriv --reuid=waystation --regid=waystation --init-groups \
  env RUST_LOG=info waystation run --config /etc/waystation/waystation.toml 2> "$log" > /dev/null &
daemon=$!
ports=()
for _ in $(seq 1 150); do
  mapfile -t ports < <(grep -oE 'listening on 127\.0\.0\.1:[0-9]+' "$log" | grep -oE '[0-9]+$')
  [ ${#ports[@]} -ge 2 ] && break
  kill -0 "$daemon" 2>/dev/null || { cat "$log" >&2; fail "the daemon exited at start"; }
  sleep 0.2
done
[ ${#ports[@]} -ge 2 ] || { cat "$log" >&2; fail "no two listeners within 30 s"; }
rc=0; timeout 20 mosquitto_pub -p "${ports[0]}" -u alice -P wrong -q 1 -t t -m x 2>/dev/null || rc=$?
[ "$rc" != 0 ] || fail "a wrong password was accepted"
timeout 20 mosquitto_pub -p "${ports[0]}" -u alice -P s3cret -q 1 -t t -m x || fail "QoS 1 publish with a password"
# Which of the two is TLS is not fixed by the log's order: try both.
ok=0
for p in "${ports[@]}"; do
  if timeout 20 mosquitto_pub -p "$p" --insecure --cafile "$R/etc/waystation/server.crt" -u bob -P other -q 1 -t t -m y 2>/dev/null; then ok=1; fi
done
[ "$ok" = 1 ] || fail "QoS 1 publish over TLS with a password"
kill -TERM "$daemon"
for _ in $(seq 1 150); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.2; done
kill -0 "$daemon" 2>/dev/null && fail "the daemon still runs 30 s after SIGTERM"
rc=0; wait "$daemon" || rc=$?; daemon=""
check "the daemon's exit after SIGTERM" "$rc" 0
owners=$(in_root find /var/lib/waystation -mindepth 1 -printf "%u\n" | sort -u)
[ -n "$owners" ] || fail "nothing stored in /var/lib/waystation"
check "owner of the store's files" "$owners" waystation

# A data_dir the daemon's user cannot write (as under ProtectSystem=strict without
# ReadWritePaths=): exit 2, a config error the unit does not restart, naming the fix.
in_root install -d -m 0755 /srv/ro-data
printf '[gateway]\ndata_dir = "/srv/ro-data/store"\n[[listener]]\nbind = "127.0.0.1:0"\n[http]\nenabled = false\n' > "$R/tmp/ro.toml"
chmod 0644 "$R/tmp/ro.toml"
rc=0; err=$(timeout 30 chroot "$R" setpriv --reuid=waystation --regid=waystation --init-groups waystation run --config /tmp/ro.toml 2>&1) || rc=$?
check "run with an unwritable data_dir (exit)" "$rc" 2
grep -q ReadWritePaths <<<"$err" || fail "the unwritable data_dir error does not name ReadWritePaths=: $err"

# --- upgrade: the edited conffile and the password file stay as they are ---
next="${version%-1}-2"
DEB_VERSION=$next bash scripts/package-deb.sh amd64 > /dev/null
cp "$(deb "$next" amd64)" "$R/tmp/ws2.deb"
rm -f "$(deb "$next" amd64)"
in_root dpkg -i /tmp/ws2.deb > "$cache/upgrade.log" 2>&1 || { cat "$cache/upgrade.log" >&2; fail "upgrade"; }
check "version after the upgrade" "$(in_root dpkg-query -W -f='${Version}' waystation)" "$next"
grep -q '^# edited by deb-check' "$R/etc/waystation/waystation.toml" || fail "the upgrade replaced the edited config"
check "the password file after the upgrade" "$(st /etc/waystation/passwd)" "root:waystation 640"
check "/etc/waystation after the upgrade" "$(st /etc/waystation)" "root:waystation 750"

# --- purge: binary, config, unit and store gone; the admin's own files stay ---
in_root dpkg --purge waystation > "$cache/purge.log" 2>&1 || { cat "$cache/purge.log" >&2; fail "purge"; }
for f in /usr/bin/waystation /etc/waystation/waystation.toml /lib/systemd/system/waystation.service /var/lib/waystation; do
  [ ! -e "$R$f" ] || fail "$f is still there after purge"
done
[ -f "$R/etc/waystation/passwd" ] || fail "purge deleted the admin's password file"

# --- every package: directories 0755, files root-owned; the ARM ones hold the same files ---
list() { dpkg-deb -c "$1" | awk '{print $1, $2, $6}' | sed 's| \./| /|'; }
bad=$(list "$(deb "$version" amd64)" | awk '($1 ~ /^d/ && $1 != "drwxr-xr-x") || $2 != "root/root"')
[ -z "$bad" ] || fail "entries with unexpected modes or owners in the package: $bad"
for arch in arm64 armhf; do
  f=$(deb "$version" "$arch")
  [ -f "$f" ] || fail "no $f"
  check "$arch package's architecture" "$(dpkg-deb -f "$f" Architecture)" "$arch"
  [ "$(list "$f")" = "$(list "$(deb "$version" amd64)")" ] || fail "$arch package's files differ from amd64's"
  check "$arch package's conffiles" "$(dpkg-deb --ctrl-tarfile "$f" | tar -xO ./conffiles)" /etc/waystation/waystation.toml
done
for arch in arm64 armhf; do
  check "$arch's dependencies (static)" "$(dpkg-deb -f "$(deb "$version" "$arch")" Depends)" ""
done
echo "deb-check: ok: installed into a fresh Debian 12 root: files, conffile, system user $uid, owners and modes, unit enabled and verified, passwd/TLS key readable by waystation (0600 refused), daemon as waystation with passwords + TLS, SIGTERM 0, unwritable data_dir exit 2, upgrade kept the edited config, purge; arm64/armhf packages hold the same files"
