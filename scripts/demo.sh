#!/usr/bin/env bash
# The SparseContext demo in one command: sets up a venv and a pinned ComfyUI (unless COMFYUI_PATH is
# given), starts ComfyUI headless with the pack, samples graphs dense and sparse (same seed), prints
# per-step timings, the speed-up and the PSNR of both against the ground truth, writes images, keep maps
# and comparison.png to demo_output/<run>/, and stops ComfyUI.
#   bash scripts/demo.sh                    # the natural-image model (experiments/natural): three cases, see below
#   bash scripts/demo.sh --task subject --example 3 --variant lora --out /tmp/demo
#   bash scripts/demo.sh --model miniature --task multi --refs 3      # the miniature (generated shapes)
#   bash scripts/demo.sh --model tiny --refs 2 --keep 0.1     # the seeded tiny FLUX.2-klein-shaped model (noise images)
#   COMFYUI_PATH=~/ComfyUI bash scripts/demo.sh --model ~/ComfyUI/models/diffusion_models/flux-2-klein-9b.safetensors \
#       --clip ~/ComfyUI/models/text_encoders/qwen_3_8b_fp8mixed.safetensors --vae ~/ComfyUI/models/vae/flux2-vae.safetensors
#   bash scripts/demo.sh --help
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_vars="$(bash "$repo/scripts/setup.sh" --dev)"  # fails if setup fails; --dev: the photographs ship in scikit-image/-learn
eval "$env_vars"
export COMFYUI_PATH
# Run by path: Python puts scripts/ (not the pack root, whose selectors/ would shadow the stdlib) on sys.path.
if [ "$#" -gt 0 ]; then
  exec "$PYTHON" "$repo/scripts/demo.py" "$@"
fi
# No arguments: three cases on the natural-image model (experiments/natural: trained here on photographs; held-out
# examples), each with its own ComfyUI start and output folder, settings from that experiment's evidence:
#   1. the strongest honest case: a subject task with the drop-robust fine-tune at the recommended keep 0.5;
#   2. multi-reference: three references composed, same model and keep;
#   3. where dropping hurts: an aligned edit at keep 0.25 with the untuned model, then what to do about it
#      (the drop-robust fine-tune at keep 0.5).
# The natural model the cases load: the long run's results folder (model files + natural.json with their sha256,
# checked at load), the better-trained of the experiment's two runs.
results="$repo/experiments/natural/results_long"
echo "[demo] The natural-image model of ${results#"$repo/"} (its natural.json has the measured quality per keep ratio)."
"$PYTHON" "$repo/scripts/demo.py" --results "$results" --task subject --example 2 --variant full_ft --keep 0.5 \
  --out "$repo/demo_output/1_subject"
echo
"$PYTHON" "$repo/scripts/demo.py" --results "$results" --task composition --example 1 --variant full_ft --keep 0.5 \
  --out "$repo/demo_output/2_multi_reference"
echo
echo "[demo] 3. where dropping hurts: an aligned edit (everything outside the region is copied token by token) at keep"
echo "[demo]    0.25 with the untuned model: a dropped token has nothing at its own position to copy"
"$PYTHON" "$repo/scripts/demo.py" --results "$results" --task edit --example 2 --variant base --keep 0.25 \
  --out "$repo/demo_output/3_edit_hurts"
echo
echo "[demo]    what to do: keep 0.5 with the drop-robust fine-tune (or LoRA), which learned to fill dropped tokens in"
"$PYTHON" "$repo/scripts/demo.py" --results "$results" --task edit --example 2 --variant full_ft --keep 0.5 \
  --out "$repo/demo_output/3_edit_fixed"
