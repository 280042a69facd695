#!/usr/bin/env bash
# Make sure QEMU's reference tools (qemu-img, qemu-io, qemu-nbd, qemu-system-x86_64,
# qemu-storage-daemon) and libnbd's nbdinfo (reads qemu-nbd's dirty-bitmap export) are installed.
#
# The test suite checks bitback against QEMU 7.2 (Debian 12's qemu-utils, qemu-system-x86).
#   - all present: print their versions, exit 0.
#   - missing, running as root with apt-get: install them non-interactively.
#   - missing, not root: print how to install them; the tests that need them are skipped.
#   - missing after all that with CI=true: exit 1, because CI must test against QEMU.
# QEMU_IMG / QEMU_IO / QEMU_SYSTEM name other binaries, as the test fixtures accept.
set -euo pipefail

packages=(qemu-utils qemu-system-x86 libnbd-bin)
tools=("${QEMU_IMG:-qemu-img}" "${QEMU_IO:-qemu-io}" "${QEMU_SYSTEM:-qemu-system-x86_64}"
       qemu-nbd qemu-storage-daemon nbdinfo)

case "${CI:-}" in
    true | TRUE | True | 1 | yes) ci=true ;;
    *) ci=false ;;
esac

say() { printf 'ensure-qemu: %s\n' "$*"; }

missing_tools() {
    local t
    for t in "${tools[@]}"; do
        command -v "$t" >/dev/null 2>&1 || printf '%s ' "$t"
    done
}

missing=$(missing_tools)
if [[ -n "$missing" ]]; then
    say "missing reference tools: ${missing% }"
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages ${packages[*]} (apt-get, non-interactive)"
        export DEBIAN_FRONTEND=noninteractive
        apt_opts=(-q -o DPkg::Lock::Timeout=300)
        if ! apt-get "${apt_opts[@]}" update </dev/null \
            || ! apt-get "${apt_opts[@]}" install -y --no-install-recommends "${packages[@]}" \
                </dev/null; then
            say "apt-get failed to install ${packages[*]}"
        fi
        missing=$(missing_tools)
    elif [[ "$(id -u)" -ne 0 ]]; then
        say "not root, so not installing them. To test against QEMU, run:"
        say "    sudo apt-get update && sudo apt-get install -y ${packages[*]}"
    else
        say "apt-get not found: install QEMU 7.2 (${packages[*]} on Debian) by hand"
    fi
fi

if [[ -n "$missing" ]]; then
    if [[ "$ci" == true ]]; then
        say "CI=true and still missing: ${missing% } -- failing the run (CI must test against QEMU)"
        exit 1
    fi
    say "NOTE: tests that need ${missing% } will be SKIPPED"
    exit 0
fi

for t in "${tools[@]}"; do
    version=$("$t" --version 2>/dev/null | head -n 1 || true)
    say "$(command -v "$t"): ${version:-version unknown}"
    case "$t:$version" in
        *" 7.2"* | nbdinfo:*) ;;
        *) say "warning: $t is not QEMU 7.2; the tests pin QEMU 7.2 behaviour" ;;
    esac
done
