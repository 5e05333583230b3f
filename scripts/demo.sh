#!/usr/bin/env bash
# The SparseContext demo in one command: sets up a venv and a pinned ComfyUI (unless COMFYUI_PATH is
# given), starts ComfyUI headless with the pack, samples graphs dense and sparse (same seed), prints
# per-step timings, the speed-up and the PSNR of both against the ground truth, writes images, keep maps
# and comparison.png to demo_output/<run>/, and stops ComfyUI.
#   bash scripts/demo.sh                    # the trained miniature model (experiments/miniature): the 3-reference
#                                           # graph, then the edit task; ~20-40 s on 2 CPU cores
#   bash scripts/demo.sh --task subject --example 3 --no-lora --out /tmp/demo
#   bash scripts/demo.sh --model tiny --refs 2 --keep 0.1     # the seeded tiny FLUX.2-klein-shaped model (noise images)
#   COMFYUI_PATH=~/ComfyUI bash scripts/demo.sh --model ~/ComfyUI/models/diffusion_models/flux-2-klein-9b.safetensors \
#       --clip ~/ComfyUI/models/text_encoders/qwen_3_8b_fp8mixed.safetensors --vae ~/ComfyUI/models/vae/flux2-vae.safetensors
#   bash scripts/demo.sh --help
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_vars="$(bash "$repo/scripts/setup.sh")"  # fails the script if setup fails
eval "$env_vars"
export COMFYUI_PATH
# Run by path: Python puts scripts/ (not the pack root, whose selectors/ would shadow the stdlib) on sys.path.
if [ "$#" -gt 0 ]; then
  exec "$PYTHON" "$repo/scripts/demo.py" "$@"
fi
# No arguments: the multi-reference graph (three references, keep 0.5, the base model: the miniature measured
# the subject/multi tasks best without the LoRA), then the edit task (one reference, keep 0.5, with the
# drop-robust LoRA, which aligned edits need), each with its own ComfyUI start and output folder.
"$PYTHON" "$repo/scripts/demo.py" --task multi --refs 3 --keep 0.5 --no-lora --out "$repo/demo_output/multi_reference"
echo
"$PYTHON" "$repo/scripts/demo.py" --task edit --keep 0.5 --out "$repo/demo_output/edit"
