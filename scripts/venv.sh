#!/usr/bin/env bash
# Create the project's virtualenv (if needed) and install bitback into it, editable, with the
# development tools: `pip install -e '.[dev]'`. Then touch the stamp file the Makefile uses to
# re-run this only when pyproject.toml changes.
#
# usage: scripts/venv.sh VENV_DIR STAMP_FILE      (PYTHON=... picks the interpreter)
set -euo pipefail

venv=${1:?usage: venv.sh VENV_DIR STAMP_FILE}
stamp=${2:?usage: venv.sh VENV_DIR STAMP_FILE}
cd "$(dirname "$0")/.."

say() { printf 'venv: %s\n' "$*"; }

pick_python() {
    local p
    for p in ${PYTHON:-} python3.11 python3; do
        if command -v "$p" >/dev/null 2>&1 \
            && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            printf '%s\n' "$p"
            return 0
        fi
    done
    return 1
}

if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    if ! python=$(pick_python); then
        say "bitback needs Python 3.11 or newer (python3.11 or python3 on PATH, or PYTHON=...)"
        exit 1
    fi
    say "creating $venv with $python ($("$python" --version 2>&1))"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
        # Debian ships venv's pip bootstrap (ensurepip) in a separate package.
        rm -rf "$venv"
        if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            say "installing Debian's python3-venv, then retrying"
            export DEBIAN_FRONTEND=noninteractive
            apt-get -q -o DPkg::Lock::Timeout=300 update </dev/null
            apt-get -q -o DPkg::Lock::Timeout=300 install -y python3-venv </dev/null
            "$python" -m venv "$venv"
        else
            say "could not create the virtualenv; on Debian: sudo apt-get install python3-venv"
            exit 1
        fi
    fi
fi

say "installing bitback (editable) with its dev tools into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -e '.[dev]'
touch "$stamp"
say "ready: $venv"
