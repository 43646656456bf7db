#!/usr/bin/env bash
# Builds the firmware crate for the CI targets and measures the QEMU board example against its
# baseline (the same board code without the firmware library):
#   flash added = (text + data) of board-lm3s6965 - (text + data) of baseline   budget 8 KiB
#   RAM         = data + bss of board-lm3s6965 + painted-stack high-water mark    budget 4 KiB
# The stack figure comes from running the board in QEMU against a local mosquitto for a few
# seconds (connect, events, a config document). Exits non-zero when over budget.
#
# What the baseline contains, so that the difference is the library's and only the library's:
# the board support (UART, SysTick clock, semihosting console and arguments, stack painting,
# panic handler) and the board's own diagnostic printing that src/main.rs does around the
# library (its `log` calls echoing event, config, link and summary lines, with their board
# strings and field shapes). bin/baseline.rs makes the same calls, fed from the echoed UART
# bytes so the optimizer keeps them; strings the library provides (direction names, config
# rejection reasons) are not in it. Before the baseline printed these lines, ~376 bytes of
# board printing code were counted as the library's.
set -euo pipefail
cd "$(dirname "$0")/.."
FLASH_BUDGET=${FLASH_BUDGET:-8192}
RAM_BUDGET=${RAM_BUDGET:-4096}
root=$PWD

echo "== waystation-firmware for thumbv7em-none-eabihf and riscv32imc-unknown-none-elf"
CARGO_TARGET_DIR="$root/target/firmware" cargo build -q -p waystation-firmware --release --target thumbv7em-none-eabihf
CARGO_TARGET_DIR="$root/target/firmware" cargo build -q -p waystation-firmware --release --target riscv32imc-unknown-none-elf

echo "== board-lm3s6965 (thumbv7m-none-eabi, release)"
(cd firmware/board-lm3s6965 && CARGO_TARGET_DIR="$root/target/firmware-board" cargo build -q --release)
bin="$root/target/firmware-board/thumbv7m-none-eabi/release"
arm-none-eabi-size "$bin/board-lm3s6965" "$bin/baseline"
read -r ftext fdata fbss _ < <(arm-none-eabi-size "$bin/board-lm3s6965" | awk 'NR==2{print $1, $2, $3}')
read -r btext bdata bbss _ < <(arm-none-eabi-size "$bin/baseline" | awk 'NR==2{print $1, $2, $3}')
flash_added=$(( (ftext + fdata) - (btext + bdata) ))
static_ram=$(( fdata + fbss ))

# Stack: run the board against mosquitto for a few seconds and take the largest report.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mosquitto -p "$port" >/dev/null 2>&1 &
mq=$!
trap 'kill $mq 2>/dev/null || true' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
mosquitto_pub -p "$port" -r -q 1 -t sensors/size-check/config -m '{"rising":35000,"falling":15000,"debounce":3}'
out=$(timeout 60 qemu-system-arm -cpu cortex-m3 -machine lm3s6965evb -nographic -monitor none \
  -semihosting-config enable=on,target=native,arg=board,arg=id=size-check,arg=period=20,arg=run_ms=5000 \
  -serial "tcp:127.0.0.1:$port" -kernel "$bin/board-lm3s6965" 2>&1 || true)
stack=$(printf '%s\n' "$out" | awk '/^stack-high-water/{ if ($2 > m) m = $2 } END { print m + 0 }')
events=$(printf '%s\n' "$out" | grep -c '^event ' || true)
if [ "$stack" -eq 0 ] || [ "$events" -eq 0 ]; then
  printf '%s\n' "$out" >&2
  echo "firmware-size: the board did not run (stack $stack, events $events)" >&2
  exit 1
fi
ram=$(( static_ram + stack ))

echo "firmware flash added: $flash_added bytes (budget $FLASH_BUDGET)"
echo "firmware RAM: $ram bytes = static $static_ram + stack $stack (budget $RAM_BUDGET, events seen $events)"
status=0
[ "$flash_added" -le "$FLASH_BUDGET" ] || { echo "OVER BUDGET: flash" >&2; status=1; }
[ "$ram" -lt "$RAM_BUDGET" ] || { echo "OVER BUDGET: RAM" >&2; status=1; }
exit $status
