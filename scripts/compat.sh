#!/usr/bin/env bash
# Runs the whole test suite and the demo against several ComfyUI installs (the host matrix), one summary line
# per host, and writes docs/compat.json plus the host table of docs/hosts.md from the results.
#   bash scripts/compat.sh                                   # the pinned 0.3.75 only (what CI runs)
#   bash scripts/compat.sh .comfyui/ComfyUI-0.3.75 ~/hosts/ComfyUI-0.10.0 ~/hosts/ComfyUI-0.30.0
#   COMPAT_PYTEST_ARGS="-k training" bash scripts/compat.sh DIR...   # a part of the suite (no host table is written)
#   bash scripts/compat.sh DIR... --nodes ~/packs/ComfyUI-GGUF ~/packs/ComfyUI-TeaCache ~/packs/Comfy-WaveSpeed
#       # also other custom-node packs (each a pack's folder, or a folder of packs): the compatibility matrix
#       # (tests/test_compat_packs.py) runs with every pack it recognises and writes docs/compatibility.md
#       # (COMPAT_PYTEST_ARGS="-k compat_packs" runs the matrix alone)
# Each host gets its own virtual environment ($SPARSECONTEXT_COMPAT_VENVS/<version>, default .compat/) with that
# ComfyUI's requirements and torch pinned by scripts/constraints.txt, set up by scripts/setup.sh as for a user's
# existing install (COMFYUI_PATH); the checkout's own pinned ComfyUI (.comfyui/) runs in the checkout's venv
# (.venv or $SPARSECONTEXT_VENV), as scripts/test.sh runs it. Getting the newer hosts (no registry serves them):
# see docs/hosts.md.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
venvs="${SPARSECONTEXT_COMPAT_VENVS:-$repo/.compat}"
results="$repo/.compat/results"  # per checkout, whatever the venv folder
mkdir -p "$results"
hosts=()
nodes=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes) shift; while [ "$#" -gt 0 ] && [ "$1" != "--hosts" ]; do nodes+=("$1"); shift; done ;;
    --hosts) shift ;;
    *) hosts+=("$1"); shift ;;
  esac
done
node_path=""
for n in "${nodes[@]}"; do
  n="$(cd "$n" 2>/dev/null && pwd -P)" || { echo "[compat] no such custom-node folder: $n" >&2; exit 2; }
  node_path="${node_path:+$node_path:}$n"
done
export SPARSECONTEXT_NODES="$node_path"  # read by tests/harness/packs.py
if [ "${#hosts[@]}" = 0 ]; then
  env_vars="$(bash scripts/setup.sh --dev)" || exit 2
  hosts=("$(eval "$env_vars"; echo "$COMFYUI_PATH")")
fi

pinned="$(cd "$repo/.comfyui/ComfyUI-0.3.75" 2>/dev/null && pwd -P)"
summaries=()
status=0
for dir in "${hosts[@]}"; do
  dir="$(cd "$dir" 2>/dev/null && pwd -P)" || { echo "[compat] no such folder: $dir" >&2; status=1; continue; }
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/comfyui_version.py" 2>/dev/null)"
  [ -n "$version" ] || { echo "[compat] $dir is not a ComfyUI (no comfyui_version.py)" >&2; status=1; continue; }
  venv="$venvs/$version"
  [ "$dir" = "$pinned" ] && venv="${SPARSECONTEXT_VENV:-$repo/.venv}"
  log="$results/$version.log"
  matrix="$results/$version.matrix.json"
  rm -f "$matrix"
  echo "[compat] ComfyUI $version at $dir (venv $venv, log $log)" >&2
  start=$(date +%s)
  # shellcheck disable=SC2086  # COMPAT_PYTEST_ARGS is a list of pytest arguments
  SPARSECONTEXT_VENV="$venv" COMFYUI_PATH="$dir" SPARSECONTEXT_MATRIX_JSON="$matrix" bash scripts/test.sh -q -rs -p no:cacheprovider \
    --junitxml="$results/$version.xml" ${COMPAT_PYTEST_ARGS:-} > "$log" 2>&1
  tests_rc=$?
  tests_s=$(( $(date +%s) - start ))
  start=$(date +%s)
  SPARSECONTEXT_VENV="$venv" COMFYUI_PATH="$dir" bash scripts/demo.sh > "$results/$version.demo.log" 2>&1
  demo_rc=$?
  demo_s=$(( $(date +%s) - start ))
  [ "$tests_rc" = 0 ] && [ "$demo_rc" = 0 ] || status=1
  summaries+=("$version|$dir|$tests_rc|$tests_s|$demo_rc|$demo_s")
done

# One line per host, docs/compat.json and the docs/hosts.md table (the summary reads the junit XML of each host).
partial=0
[ -n "${COMPAT_PYTEST_ARGS:-}" ] && partial=1
python3 "$repo/scripts/compat_summary.py" --results "$results" --partial "$partial" --nodes "$node_path" \
  "${summaries[@]}" || status=1
exit "$status"
