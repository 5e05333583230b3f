"""Publishing to the Comfy Registry: comfy-cli's own ``node validate`` and ``node pack`` pass on a copy of the
working tree, the zip keeps the pack and drops the development folders, and the README reads right inside it
(absolute links only, images as URLs of the Repository and not shipped, a square icon)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]
RAW = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def _comfy() -> str:
    exe = Path(sys.executable).parent / "comfy"  # the venv running the tests (scripts/test.sh: $SPARSECONTEXT_VENV)
    found = str(exe) if exe.exists() else shutil.which("comfy")
    if found is None:
        pytest.fail("comfy-cli is not installed (requirements-dev.txt: comfy-cli)")
    return found


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, zipfile.ZipFile, str]:
    """A copy of the tracked and new files (what a clone has), validated and packed by comfy-cli."""
    tree = tmp_path_factory.mktemp("registry") / "sparse-context"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)  # comfy-cli reads .comfyignore next to a repo
    env = {**os.environ, "HOME": str(tree.parent)}  # comfy-cli writes its config under the home folder
    log = ""
    for command in (["node", "validate"], ["node", "pack"]):
        proc = subprocess.run([_comfy(), "--skip-prompt", "--no-enable-telemetry", *command], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=300)
        log += proc.stdout + proc.stderr
        assert proc.returncode == 0, f"comfy {' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
    return tree, zipfile.ZipFile(tree / "node.zip"), log


def test_comfy_cli_validates_and_packs(packed):
    _, zf, log = packed
    assert "validation checks passed" in log
    names = set(zf.namelist())
    for needed in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE",
                   "nodes/apply_node.py", "nodes/calibrate_node.py", "sparse_attention/patch.py",
                   "selectors/edges.py", "training/trainer.py", "scripts/train_lora.py", "docs/icon.png"):
        assert needed in names, needed
    assert any(n.startswith("workflows/") and n.endswith(".json") for n in names)
    stripped = ("tests/", "benchmarks/", "experiments/", ".ci/", "scripts/demo.py", "requirements-dev.txt")
    assert not [n for n in names if n.startswith(stripped)], "development files in the published zip"


def test_readme_links_are_absolute_and_pictures_stay_out_of_the_zip(packed):
    """The registry shows the README outside the repository: every link is absolute (that each resolves to a file of
    the repository is tests/test_repository.py's check); the pictures it links by URL need not ship."""
    _, zf, _ = packed
    names = set(zf.namelist())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    relative = [t for t in LINK.findall(readme) if not t.startswith(("#", "mailto:", "http://", "https://"))]
    assert not relative, f"relative links (the registry shows the README outside the repository): {relative}"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme)
    assert images and all(i.startswith(RAW) for i in images), images
    assert not [n for n in names if n.startswith("docs/") and n != "docs/icon.png"], "docs/ beyond the icon ships"


def test_registry_metadata_and_square_icon():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and REPOSITORY.startswith("https://github.com/")
    assert comfy["Icon"] == RAW + "docs/icon.png"
    with Image.open(ROOT / "docs" / "icon.png") as icon:
        assert icon.size[0] == icon.size[1] >= 128
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    assert any(c.startswith("Environment :: GPU") for c in classifiers)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"git clone {REPOSITORY}" in readme and "placeholder" in readme.lower()
