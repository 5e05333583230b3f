#!/usr/bin/env bash
# Unpacks one commit of a ComfyUI git snapshot into a folder, blob by blob: snapshots here lack a few large
# blobs (tokenizer JSONs), where `git archive` would stop; those files are skipped and listed.
#   bash scripts/unpack_host.sh GIT_DIR COMMIT DEST
#   e.g. bash scripts/unpack_host.sh /work/.mirror/silveroxides+ComfyUI/repo b1693ecb ~/hosts/ComfyUI-0.30.0
set -euo pipefail
[ "$#" = 3 ] || { sed -n '2,5p' "$0" >&2; exit 2; }
git_dir="$1" commit="$2" dest="$3"
git -C "$git_dir" cat-file -e "$commit^{commit}" || { echo "[unpack] $commit is not a commit of $git_dir" >&2; exit 2; }
mkdir -p "$dest"
git -C "$git_dir" ls-tree -r "$commit" | while read -r _mode type sha path; do
  [ "$type" = blob ] || continue
  mkdir -p "$dest/$(dirname "$path")"
  git -C "$git_dir" cat-file blob "$sha" > "$dest/$path" 2>/dev/null || { rm -f "$dest/$path"; echo "[unpack] missing: $path" >&2; }
done
echo "[unpack] ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dest/comfyui_version.py") in $dest" >&2
