"""One process of a distributed training test, started by ``torchrun`` (or directly, with the ``env://`` variables
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set): ``scripts/train_lora.py``'s ``run`` (all of the command line
after loading the model) on the test pack's tiny real FLUX.1 Kontext model, on the CPU. Its exit status is ``run``'s.

    torchrun --nproc_per_node 2 ... tests/harness/train_worker.py WORKDIR -- <train_lora.py arguments>

Each rank runs in ``WORKDIR/rank<N>``, so the files a rank writes with the relative ``--out`` it is given land in
its own folder (the test sees which ranks wrote), and a relative ``--data`` reads that rank's own copy. The pack is
imported as a package (scripts/packload), as in the tests; ComfyUI runs on the CPU with one thread per process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # packload (the repository root itself never goes on sys.path)
from packload import load_harness, load_pack, load_testpack  # noqa: E402

FAMILY = "flux1_kontext"


def main(argv: list[str]) -> int:
    workdir, rest = Path(argv[0]), argv[argv.index("--") + 1:]
    load_harness()
    from sc_harness.host import import_comfy_on_cpu

    import_comfy_on_cpu()
    import torch

    torch.set_num_threads(1)
    training = load_pack().training
    testpack = load_testpack()
    spec = importlib.util.spec_from_file_location("sc_train_lora_cli", REPO / "scripts" / "train_lora.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rank_dir = workdir / f"rank{os.environ.get('RANK', '0')}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(rank_dir)
    model = testpack.build_model_patcher(FAMILY, 0)
    return cli.run(cli.parse_args(rest), training, model, lambda family: testpack.StandInEncoder(FAMILY))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
