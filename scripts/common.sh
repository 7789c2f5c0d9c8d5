# Sourced by scripts/demo and scripts/test: Debian packages and the project venv.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# Install the Debian packages named in "$@" that are not installed yet (one dpkg query
# each, so a machine that has them all skips apt entirely).
apt_install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "$0: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "$0: installing ${missing[*]}" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# Create $VENV if needed and pip-install the project into it with the pip arguments "$@"
# (e.g. -e '.[test]'); skipped when the same arguments were installed from the same pyproject.toml.
venv_install() {
    if [ ! -x "$VENV/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    local stamp="$VENV/.nbdserve-installed" want
    want="$* $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && grep -qxF -- "$want" "$stamp"; then
        return 0
    fi
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet "$@")
    echo "$want" >> "$stamp"
}
