# Shared by scripts/test and scripts/lint; source it, do not run it.
# shellcheck shell=bash

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="${BROKER_VENV:-$REPO/.venv}"
_SCRIPT_NAME="scripts/$(basename "$0")"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

log() { printf '%s: %s\n' "$_SCRIPT_NAME" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$_SCRIPT_NAME" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$_SCRIPT_NAME" "$*" >&2
    exit 1
}

# True when running in CI (the CI system sets CI=true).
in_ci() {
    case "${CI:-}" in
        true | TRUE | True | 1 | yes) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------- timing
_PHASE_NAMES=()
_PHASE_SECS=()
_PHASE_STARTED=""
_PHASE_CURRENT=""
_T0="$(date +%s%N)"

phase() { # phase NAME: end the running phase (if any) and start NAME
    phase_end
    _PHASE_CURRENT="$1"
    _PHASE_STARTED="$(date +%s%N)"
}

phase_end() {
    [[ -n "$_PHASE_CURRENT" ]] || return 0
    local now
    now="$(date +%s%N)"
    _PHASE_NAMES+=("$_PHASE_CURRENT")
    _PHASE_SECS+=("$(_secs "$_PHASE_STARTED" "$now")")
    _PHASE_CURRENT=""
}

_secs() { # nanosecond timestamps -> seconds with one decimal
    local ms=$((($2 - $1) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

timing_summary() {
    phase_end
    local i
    printf '%s: timing:' "$_SCRIPT_NAME" >&2
    for i in "${!_PHASE_NAMES[@]}"; do
        printf ' %s %ss,' "${_PHASE_NAMES[$i]}" "${_PHASE_SECS[$i]}" >&2
    done
    printf ' total %ss\n' "$(_secs "$_T0" "$(date +%s%N)")" >&2
}

# ---------------------------------------------------------------- python + venv

# The interpreter used to create the venv: BROKER_PYTHON, else python3 on PATH.
find_python() {
    local py="${BROKER_PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 ||
        die "$py not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv) or set BROKER_PYTHON"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        die "$py is Python $("$py" -c 'import platform; print(platform.python_version())'); the broker needs 3.11 or newer: set BROKER_PYTHON to a newer interpreter"
    fi
    printf '%s\n' "$py"
}

# What the installed set depends on: when this changes, pip runs again.
_install_stamp() {
    local pyver
    pyver="$("$VENV/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null | head -n1)"
    printf '%s\n%s\n%s\n' "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" "$pyver" "$REPO"
}

# The editable install must point at this checkout (a shared BROKER_VENV may point elsewhere).
_venv_is_usable() {
    "$VENV/bin/python" - "$REPO" <<'EOF' >/dev/null 2>&1
import os, sys
import broker, pytest, hypothesis  # noqa: F401
paths = {os.path.realpath(p) for p in broker.__path__}
sys.exit(0 if os.path.realpath(os.path.join(sys.argv[1], "broker")) in paths else 1)
EOF
}

# Create the venv if needed and install the project with its dev extras ([dev] pulls
# [all]: the server, PostgreSQL, HTCondor, PAM and token extras the tests use) when
# pyproject.toml (or the interpreter, or the checkout) changed since the last install.
ensure_venv() {
    local py stamp_file="$VENV/.broker-install-stamp"
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
        py="$(find_python)"
        if [[ -e "$VENV" ]]; then
            log "the venv at $VENV is broken; recreating it with $py"
            "$py" -m venv --clear "$VENV" ||
                die "could not recreate $VENV; remove it and run again"
        else
            log "creating a venv at $VENV with $py"
            "$py" -m venv "$VENV" ||
                die "could not create a venv with $py; on Debian install python3-venv (apt-get install python3-venv)"
        fi
    fi
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "the venv at $VENV uses Python older than 3.11; remove it (or set BROKER_VENV) and run again"

    if [[ -f "$stamp_file" ]] && [[ "$(cat "$stamp_file")" == "$(_install_stamp)" ]] && _venv_is_usable; then
        return 0
    fi
    log "installing the project and its dev extras into $VENV (pyproject.toml changed or first run)"
    "$VENV/bin/python" -m pip install --quiet -e "$REPO[dev]" ||
        die "pip install -e '.[dev]' failed; see the output above"
    _venv_is_usable ||
        die "after pip install, the venv at $VENV still cannot import broker from $REPO, pytest and hypothesis"
    _install_stamp >"$stamp_file"
}

# ---------------------------------------------------------------- system packages
# ensure_apt_packages: install the missing packages of the caller's APT_PACKAGES array.
ensure_apt_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        warn "not a Debian system (no dpkg-query); not checking system packages: ${APT_PACKAGES[*]}"
        return 0
    fi
    local missing=() pkg
    local installed
    installed="$(dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n' "${APT_PACKAGES[@]}" 2>/dev/null |
        awk -F'\t' '$2 ~ /^ii/ { print $1 }' || true)"
    for pkg in "${APT_PACKAGES[@]}"; do
        grep -qxF "$pkg" <<<"$installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0

    if [[ "$(id -u)" -ne 0 ]]; then
        warn "missing system packages: ${missing[*]}"
        warn "not root, so not installing them; what needs them will be skipped" \
            "(run: sudo apt-get install ${missing[*]})"
        return 0
    fi
    log "installing missing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; then
        if in_ci; then
            die "apt-get could not install: ${missing[*]}"
        fi
        warn "apt-get could not install: ${missing[*]}; continuing, what needs them will be skipped"
    fi
}

