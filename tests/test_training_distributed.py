"""Data-parallel training: ``torchrun`` starts 2 processes (Gloo on the CPU, 127.0.0.1, a free port) that run
``scripts/train_lora.py``'s training on the tiny real FLUX.1 Kontext model (tests/harness/train_worker.py), compared
with the same command line in one process (in this test process)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sc_harness.host import REPO
from sparse_context import training as tr

FAMILY = "flux1_kontext"
WORKER = REPO / "tests" / "harness" / "train_worker.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli():
    spec = importlib.util.spec_from_file_location("sc_train_lora_cli", REPO / "scripts" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _examples(folder: Path, n: int, first_seed: int) -> Path:
    """``n`` example files (the test pack's seeded latents; the target is the reference with channels permuted)."""
    import sc_testpack

    folder.mkdir(parents=True)
    context, extra = sc_testpack.make_conditioning(FAMILY, 5)[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for i in range(n):
        ref = sc_testpack.make_latent(FAMILY, first_seed + i, 64, 64) / 0.3611 + 0.1159
        tr.save_example(folder / f"{i:04d}.safetensors",
                        tr.TrainingExample(ref[:, perm].clone(), [ref], context, extra["pooled_output"], guidance=2.5))
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(workdir: Path, nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"  # the venv's console script
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    command = [str(torchrun), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(WORKER), str(workdir), "--", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if not k.startswith("optimizer.")}


def _common(data: Path, held: Path, out: str, steps: int) -> list[str]:
    return ["--model", "unused", "--data", str(data), "--validation", str(held), "--out", out, "--steps", str(steps),
            "--rank", "4", "--lr", "1e-2", "--warmup", "0", "--grad-accum", "4", "--validate-every", "2",
            "--checkpoint-every", "2", "--save-dtype", "fp32", "--seed", "3"]


def test_two_processes_train_the_lora_one_process_trains_and_resume_with_one(tmp_path, capsys):
    import sc_testpack

    cli = _cli()
    data, held = _examples(tmp_path / "data", 5, 100), _examples(tmp_path / "held", 2, 1000)

    # 2 processes, 4 steps of 4 examples (2 per process)
    done = _torchrun(tmp_path / "two", 2, _common(data, held, "out/lora.safetensors", 4))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    two = tmp_path / "two" / "rank0" / "out"
    assert sorted(p.name for p in (two / "lora_checkpoints").iterdir()) == [
        "checkpoint_000002.safetensors", "checkpoint_000004.safetensors"]
    assert {p.name for p in two.iterdir()} == {"lora.safetensors", "lora.curves.png", "lora.log.json",
                                               "lora_checkpoints"}
    assert [p for p in (tmp_path / "two" / "rank1").rglob("*")] == []  # only rank 0 wrote files
    assert "2 processes: 4 examples per step in all (2 per process)" in done.stdout

    # the same command line in one process, 6 steps
    cli.train(cli.parse_args(_common(data, held, str(tmp_path / "one" / "lora.safetensors"), 6)), tr,
              sc_testpack.build_model_patcher(FAMILY, 0), None)
    capsys.readouterr()
    one_log = json.loads((tmp_path / "one" / "lora.log.json").read_text(encoding="utf-8"))
    two_log = json.loads((two / "lora.log.json").read_text(encoding="utf-8"))
    with capsys.disabled():
        print(f"\nlosses, 1 process:   {[f'{v:.6f}' for v in one_log['losses']]}")
        print(f"losses, 2 processes: {[f'{v:.6f}' for v in two_log['losses']]}")
    assert two_log["losses"] == pytest.approx(one_log["losses"][:4], rel=1e-5)
    for a, b in zip(two_log["validation"], one_log["validation"][:3], strict=True):  # aggregated over the ranks
        assert a["step"] == b["step"] and a["dense_psnr"] == pytest.approx(b["dense_psnr"], rel=1e-5)
        assert a["sparse_psnr"] == pytest.approx(b["sparse_psnr"], rel=1e-5)
    # the LoRA after 4 steps: 2 processes vs 1
    after_two, after_one = _lora(two / "lora.safetensors"), _lora(tmp_path / "one" / "lora_checkpoints" /
                                                                    "checkpoint_000004.safetensors")
    assert after_two.keys() == after_one.keys() and len(after_two) == 30
    worst = max(float((after_two[k] - after_one[k]).abs().max()) for k in after_two)
    moved = min(float(after_one[k].abs().max()) for k in after_one if ".lora_up." in k)
    with capsys.disabled():
        print(f"LoRA after 4 steps, 2 processes vs 1: max abs difference {worst:.2e} (smallest up factor {moved:.2e})")
    assert worst < 1e-5 and moved > 1e-3  # float32 sums in another order, through Adam

    # resume the 2-process checkpoint of step 2 in one process: the same curve as the uninterrupted run
    args = _common(data, held, str(tmp_path / "resumed" / "lora.safetensors"), 6)
    cli.train(cli.parse_args(args + ["--resume", str(two / "lora_checkpoints" / "checkpoint_000002.safetensors")]),
              tr, sc_testpack.build_model_patcher(FAMILY, 0), None)
    assert "resumed from" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "resumed" / "lora.log.json").read_text(encoding="utf-8"))
    assert resumed["losses"] == pytest.approx(one_log["losses"], rel=1e-5)
    final_one, final_resumed = _lora(tmp_path / "one" / "lora.safetensors"), _lora(tmp_path / "resumed" / "lora.safetensors")
    assert max(float((final_one[k] - final_resumed[k]).abs().max()) for k in final_one) < 1e-5


def _start_ranks(workdir: Path, world_size: int, args: list[str]) -> list[subprocess.Popen]:
    """The job's processes started directly (no torchrun agent that would end the others when one exits): each
    one's own exit status and output are what the test checks."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(workdir), "--", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_rank_that_fails_at_a_step_stops_every_rank_and_the_last_checkpoint_resumes(tmp_path, capsys):
    """Rank 1's copy of the data holds one example encoded for another model (its text is 12 features wide, the
    model's 16): it loads, and fails in rank 1's forward at step 3 only (rank 0's copy is good)."""
    import sc_testpack
    from safetensors import safe_open

    cli = _cli()
    steps, every, accum = 4, 2, 2
    work = tmp_path / "job"
    for rank in (0, 1):
        _examples(work / f"rank{rank}" / "data", 8, 100)
    # which example rank 1 draws at step 3 (micro-step 2 * 2 + 1; every micro-step of the first epoch draws another)
    probe = tr.LoraTrainer(sc_testpack.build_model_patcher(FAMILY, 0), tr.LoraConfig(rank=4),
                           tr.TrainConfig(seed=3, grad_accumulation=accum))
    bad = probe._micro_draw(2 * accum + 1, 8)[0]
    bad_file = work / "rank1" / "data" / f"{bad:04d}.safetensors"
    good = tr.load_example(bad_file)
    tr.save_example(bad_file, tr.TrainingExample(good.target, good.references, good.context[:, :, :12].clone(),
                                                 good.pooled, guidance=2.5))

    args = ["--model", "unused", "--data", "data", "--out", "out/lora.safetensors", "--steps", str(steps),
            "--rank", "4", "--lr", "1e-2", "--warmup", "0", "--grad-accum", str(accum), "--validate-every", "0",
            "--checkpoint-every", str(every), "--save-dtype", "fp32", "--seed", "3"]
    bound = 240
    start = time.monotonic()
    procs = _start_ranks(work, 2, args)
    try:
        outputs = [p.communicate(timeout=max(1.0, bound - (time.monotonic() - start))) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.monotonic() - start
    codes = [p.returncode for p in procs]
    (_, err0), (_, err1) = outputs
    with capsys.disabled():
        print(f"\nexit codes {codes} after {seconds:.1f} s\nrank 0: {err0.strip().splitlines()[-1]}\n"
              f"rank 1: {err1.strip().splitlines()[-1]}")
    assert codes == [1, 1] and seconds < bound, err0[-3000:] + err1[-3000:]
    assert (f"train_lora.py: training failed on rank 1 at step 3, on example {bad_file.name}: RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied") in err1
    assert "train_lora.py: training stopped at step 3: rank(s) 1 of 2 failed" in err0
    assert "Traceback" not in err0 + err1  # a message, not a deep trace

    # rank 0 wrote the checkpoint of step 2 and nothing after it; the failed step left no partial file
    folder = work / "rank0" / "out" / "lora_checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_000002.safetensors"]
    assert not (work / "rank0" / "out" / "lora.safetensors").exists()
    assert [p for p in (work / "rank1").rglob("*") if "data" not in p.parts] == []
    checkpoint = tr.latest_checkpoint(folder)
    with safe_open(str(checkpoint), framework="pt") as f:
        written = json.loads(f.metadata()[tr.resume.CHECKPOINT_KEY])
    assert written["step"] == 2 and len(written["losses"]) == 2

    # it loads and resumes (one process, the good data) to the end
    out = tmp_path / "resumed" / "lora.safetensors"
    resumed_args = [a if a != "data" else str(work / "rank0" / "data") for a in args]
    resumed_args[resumed_args.index("--out") + 1] = str(out)
    cli.train(cli.parse_args(resumed_args + ["--resume", str(checkpoint)]), tr,
              sc_testpack.build_model_patcher(FAMILY, 0), None)
    assert f"resumed from {checkpoint} at step 2" in capsys.readouterr().out
    log = json.loads(out.with_name("lora.log.json").read_text(encoding="utf-8"))
    assert log["losses"][:2] == written["losses"] and len(log["losses"]) == steps
    assert tr.read_header(out)  # the finished LoRA
