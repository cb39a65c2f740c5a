#!/usr/bin/env bash
# A local wheelhouse for an offline image build; prints its directory on stdout.
#
# Every wheel the image installs -- torch at the version constraints.txt pins (pip finds the host's
# CPU build through its own find-links; no index a container could reach has it), the project's
# dependencies at their pinned versions, and the build backend of the project itself -- made on the
# host with `pip wheel` (which downloads wheels as they are and builds any sdist), for the host's
# Python, which must be the image's (3.11). Kept in the cache under a key of what it was made from,
# so a later run (or another clone) reuses it.
#
# Settings (environment): DSI_E2E_CACHE (default ~/.cache/dsi-e2e), PYTHON (default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE="${DSI_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsi-e2e}"
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

log() { printf 'wheelhouse: %s\n' "$*" >&2; }

pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
[[ "$pyver" == 3.11 ]] || { log "$PY is Python $pyver; the image's Python is 3.11"; exit 1; }

# What goes in: torch's pin, the project's dependencies, the build backend of pyproject.toml.
requirements="$("$PY" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
pins = open("constraints.txt").read()
torch = re.search(r"^torch==(\S+)$", pins, re.M)
assert torch, "constraints.txt pins no torch"
print(f"torch=={torch.group(1)}")
print("\n".join(project["project"]["dependencies"]))
print("\n".join(project["build-system"]["requires"]))
EOF
)"
key="$( { echo "$requirements"; cat constraints.txt; uname -m; echo "py$pyver"; } | sha256sum | cut -c1-16)"
dir="$CACHE/wheelhouse/$key"
if [[ -f "$dir/.complete" ]]; then
  log "reusing $dir"
  echo "$dir"
  exit 0
fi
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
echo "$requirements" >"$dir.tmp/requirements.txt"
log "pip wheel into $dir (torch from the host's own wheels)"
"$PY" -m pip wheel --quiet --wheel-dir "$dir.tmp" -c constraints.txt -r "$dir.tmp/requirements.txt" \
  >"$dir.tmp/pip.log" 2>&1 || { tail -n 30 "$dir.tmp/pip.log" >&2; exit 1; }
ls "$dir.tmp"/torch-*.whl >/dev/null 2>&1 || { log "no torch wheel was found"; exit 1; }
rm -f "$dir.tmp/pip.log"
touch "$dir.tmp/.complete"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
# Wheelhouses of older requirements are not used again.
find "$CACHE/wheelhouse" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$dir"
