"""Where the real ComfyUI lives, and how to import it in-process on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINNED_VERSION = "0.3.75"


def comfyui_path() -> Path:
    """``$COMFYUI_PATH`` if set, else the pinned ComfyUI that ``scripts/setup.sh`` provisions."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else REPO / ".comfyui" / f"ComfyUI-{PINNED_VERSION}"
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(
            f"No ComfyUI at {path}. Run `bash scripts/setup.sh --dev` (provisions ComfyUI {PINNED_VERSION}) "
            "or set COMFYUI_PATH to a ComfyUI folder."
        )
    return path.resolve()


def comfyui_version(path: Path | None = None) -> str:
    text = ((path or comfyui_path()) / "comfyui_version.py").read_text(encoding="utf-8")
    return text.split("__version__", 1)[1].split('"')[1]


def core_checks_v3_combos() -> bool:
    """Whether core refuses an unknown V3 ``io.Combo`` value at queue time: 0.3.75's ``validate_inputs`` checks
    only V1-style option lists; 0.10.0 and later also check ``COMBO`` inputs."""
    return tuple(int(p) for p in comfyui_version().split(".")[:2]) >= (0, 10)


def import_comfy_on_cpu() -> Path:
    """Put ComfyUI on sys.path (once) and make it run on the CPU before ``comfy.model_management`` loads."""
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (now initialised for the CPU)

    return path
