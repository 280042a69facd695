#!/usr/bin/env bash
# A guided tour of what bitback does today, using its installed command-line tools.
#
# It builds a two-image backing chain, writes known patterns into both layers, reads them back
# through the chain, flattens the chain into one standalone image, then checks and compares the
# result -- with bitback's own tools and, where installed, with QEMU's qemu-img as a referee.
# Everything happens in a temporary directory that is removed at the end (KEEP=1 keeps it).
#
# The tools are taken from the environment, so the same script can be pointed at QEMU:
#   IMG=qemu-img IO=qemu-io scripts/demo.sh
# QEMU_IMG names the reference qemu-img (set it empty to skip the cross-checks).
set -euo pipefail

IMG=${IMG:-bitback-img}
IO=${IO:-bitback-io}
QEMU_IMG=${QEMU_IMG-qemu-img}
KEEP=${KEEP:-}

for tool in "$IMG" "$IO"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "demo: '$tool' not found on PATH; run 'make demo' (it installs bitback in .venv)" >&2
        exit 1
    fi
done
if [[ -n "$QEMU_IMG" ]] && ! command -v "$QEMU_IMG" >/dev/null 2>&1; then
    QEMU_IMG=""
fi

work=$(mktemp -d -t bitback-demo.XXXXXX)
cleanup() {
    if [[ -n "$KEEP" ]]; then
        echo "demo: kept the images in $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
cd "$work"

bold="" plain=""
if [[ -t 1 ]]; then
    bold=$'\033[1m' plain=$'\033[0m'
fi
step_no=0
step() {
    step_no=$((step_no + 1))
    printf '\n%s%d. %s%s\n' "$bold" "$step_no" "$*" "$plain"
}
explain() { printf '   -> %s\n' "$*"; }

# quote WORD...: the words as a shell would need them typed (quotes only where needed).
quote() {
    local w out=""
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then
            out+="$w "
        else
            out+="'${w//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${out% }"
}

# run EXPECTED_EXIT_CODE COMMAND...: show the command and its output, insist on its exit code.
run() {
    local want=$1 rc=0
    shift
    printf '   $ %s\n' "$(quote "$@")"
    "$@" 2>&1 | sed 's/^/     /' || rc=${PIPESTATUS[0]}
    if [[ "$rc" -ne "$want" ]]; then
        printf '\ndemo: FAILED at step %d: "%s" exited %d, expected %d\n' \
            "$step_no" "$(quote "$@")" "$rc" "$want" >&2
        exit 1
    fi
}

echo "bitback demo: $IMG and $IO${QEMU_IMG:+, cross-checked with $QEMU_IMG} (in $work)"

step "Create an empty 64 MiB qcow2 image, base.qcow2"
run 0 "$IMG" create -f qcow2 base.qcow2 64M
explain "base.qcow2 is a sparse qcow2 file: 64 MiB to the guest, only metadata on disk."

step "Write two patterned areas into base.qcow2"
run 0 "$IO" -f qcow2 -c 'write -P 0x41 0 1M' -c 'write -P 0x42 4M 1M' base.qcow2
explain "[0, 1M) is now filled with byte 0x41 ('A') and [4M, 5M) with 0x42 ('B')."

step "Create an overlay, top.qcow2, backed by base.qcow2"
run 0 "$IMG" create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
explain "top.qcow2 stores nothing yet: every read falls through to base.qcow2."

step "Write into the overlay: new data, a zeroed range, and data past base's areas"
run 0 "$IO" -f qcow2 -c 'write -P 0x43 512k 1M' -c 'write -z 4M 512k' \
    -c 'write -P 0x44 32M 2M' top.qcow2
explain "The overlay now hides part of base: [512k, 1.5M) reads 'C', [4M, 4.5M) reads zeros,"
explain "and [32M, 34M) reads 'D'. base.qcow2 itself was not touched."

step "Read the guest's view back through the chain and verify every byte"
run 0 "$IO" -f qcow2 \
    -c 'read -P 0x41 0 512k' -c 'read -P 0x43 512k 1M' -c 'read -P 0 1536k 2560k' \
    -c 'read -P 0 4M 512k' -c 'read -P 0x42 4608k 512k' -c 'read -P 0x44 32M 2M' \
    -c 'read -P 0 34M 30M' top.qcow2
explain "Each read checked its pattern: the overlay's data wins where it has some, base's shows"
explain "through elsewhere, and untouched areas read as zeros."

step "Look at the chain: image info and the allocation map"
run 0 "$IMG" info top.qcow2
run 0 "$IMG" map top.qcow2
explain "map lists which file holds each guest range: some from top.qcow2, some from base.qcow2."

step "Flatten the chain into one standalone image with convert"
run 0 "$IMG" convert -f qcow2 -O qcow2 top.qcow2 standalone.qcow2
run 0 "$IMG" info standalone.qcow2
run 0 "$IMG" map standalone.qcow2
explain "standalone.qcow2 holds the guest's whole view and has no backing file."

step "Check the new image's metadata for consistency"
run 0 "$IMG" check standalone.qcow2
if [[ -n "$QEMU_IMG" ]]; then
    run 0 "$QEMU_IMG" check standalone.qcow2
    explain "Both bitback and QEMU's own qemu-img found no errors and no leaked clusters."
else
    explain "No errors and no leaked clusters (qemu-img not installed: no second opinion)."
fi

step "Compare the standalone image with the chain it came from"
run 0 "$IMG" compare top.qcow2 standalone.qcow2
if [[ -n "$QEMU_IMG" ]]; then
    run 0 "$QEMU_IMG" compare top.qcow2 standalone.qcow2
fi
explain "Identical guest contents (exit code 0)."
run 1 "$IMG" compare base.qcow2 standalone.qcow2
explain "Against base.qcow2 alone they differ (exit code 1): compare names the first offset."

step "Remove the chain and read the standalone image on its own"
rm base.qcow2 top.qcow2
run 0 "$IO" -f qcow2 \
    -c 'read -P 0x41 0 512k' -c 'read -P 0x43 512k 1M' -c 'read -P 0 4M 512k' \
    -c 'read -P 0x42 4608k 512k' -c 'read -P 0x44 32M 2M' standalone.qcow2
explain "Every pattern is still there: standalone.qcow2 needs no other file."

printf '\nbitback demo: all %d steps succeeded.\n' "$step_no"
