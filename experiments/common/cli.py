"""The experiments' shared command line and where a run writes.

No run writes over committed files unless asked: by default (the smoke run too) a run writes to a scratch folder
(``out/experiments/<name>/``, git-ignored); ``--out DIR`` names the folder, ``--publish`` writes the committed
results folder (``experiments/<name>/results/``), the one home of the experiment's JSON, figure and model files.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parser(doc: str, *, threads: int) -> argparse.ArgumentParser:
    """--smoke, --out, --publish, --threads and --resummarize; an experiment adds its own options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything (CI)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="results folder (default: the scratch folder out/experiments/<name>/, git-ignored)")
    where.add_argument("--publish", action="store_true",
                       help="write the committed results folder of the experiment (replaces its files)")
    ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    ap.add_argument("--resummarize", action="store_true",
                    help="no training: recompute the summary and figure of the run in --out (or, with --publish, "
                         "of the published run)")
    return ap


def results_folder(args: argparse.Namespace, experiment: str, published: str = "results") -> Path:
    """Where this run writes: --out, the published folder ``experiments/<experiment>/<published>`` with
    --publish, else the scratch folder."""
    if args.out is not None:
        return args.out
    if args.publish:
        return ROOT / "experiments" / experiment / published
    return ROOT / "out" / "experiments" / (experiment + ("_smoke" if args.smoke else ""))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    """``{file name: sha256}`` of a run's model files, recorded in its results JSON (the demo checks them)."""
    return {name: sha256(Path(folder) / name) for name in names}


def stage_logger():
    """``log(msg)``: a line with the seconds since this call."""
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    return log
