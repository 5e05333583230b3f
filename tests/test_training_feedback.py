"""Training data and feedback on tiny REAL ComfyUI models: a folder of image examples, the CLI (validation,
progress bar, checkpoints, resume, curves), and the Train node's progress bar, curves image and resume.

Images are encoded by the test pack's stand-in VAE / text encoder (no weights exist at tiny sizes); the
ComfyUI encoder runs the real ones in ``scripts/train_lora.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sc_harness.host import REPO
from sparse_context import training as tr

FAMILY = "flux1_kontext"


pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, seed: int, size=(64, 48)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _image_folder(root, names: list[str], refs: int = 1):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sub = root / name
        sub.mkdir()
        _png(sub / "target.png", 10 * i)
        for r in range(refs):
            _png(sub / (f"ref{r + 1}.png" if refs > 1 else "ref.png"), 10 * i + r + 1)
        (sub / "caption.txt").write_text(f"make example {name} blue\n", encoding="utf-8")
    return root


# -- a folder of examples -----------------------------------------------------------------------------------------
def test_example_folder_reads_image_examples_and_example_files(tmp_path):
    import sc_testpack

    data = _image_folder(tmp_path / "data", ["b_second", "a_first"])
    three = data / "c_three_refs"
    three.mkdir()
    _png(three / "target.jpg", 5, (80, 80))
    for name in ("ref10.png", "ref2.png", "ref1.webp"):
        _png(three / name, len(name), (32, 32))
    (three / "caption.txt").write_text("three references", encoding="utf-8")
    encoder = sc_testpack.StandInEncoder(FAMILY)
    saved = tr.TrainingExample(encoder.latent(torch.rand(1, 64, 64, 3)), [encoder.latent(torch.rand(1, 32, 32, 3))],
                               torch.randn(1, 8, 16), torch.randn(1, 8))
    tr.save_example(data / "0001.safetensors", saved, prompt="saved by the node")

    examples = tr.load_example_folder(data, encoder, resolution=64)
    assert [e.meta.get("source") for e in examples] == [None, "a_first", "b_second", "c_three_refs"]
    assert examples[0].meta == {"prompt": "saved by the node"} and torch.equal(examples[0].target, saved.target)
    first = examples[1]
    # 64x48 scaled to about 64^2 pixels with 16-pixel sides: 80x48 pixels -> a 16-channel latent at 1/8
    assert first.target.shape == (1, 16, 6, 10) and first.references[0].shape == (1, 16, 6, 10)
    assert first.meta["prompt"] == "make example a_first blue" and first.pooled.shape == (1, 8)
    refs = examples[3].references
    assert len(refs) == 3 and all(r.shape == (1, 16, 8, 8) for r in refs)  # 32x32 -> 64x64 pixels
    order = [tr.find_image_examples(data)[2].references[i].name for i in range(3)]
    assert order == ["ref1.webp", "ref2.png", "ref10.png"]  # natural order

    with pytest.raises(ValueError, match="need a VAE and a text encoder"):
        tr.load_example_folder(data)
    (three / "caption.txt").unlink()
    with pytest.raises(ValueError, match="c_three_refs: an example folder needs one target image"):
        tr.load_example_folder(data, encoder, resolution=64)


# -- the command line ------------------------------------------------------------------------------------------
def _cli():
    spec = importlib.util.spec_from_file_location("sc_train_lora_cli", REPO / "scripts" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_trains_from_an_image_folder_with_validation_progress_checkpoints_and_resume(tmp_path, capsys):
    import sc_testpack

    cli = _cli()
    data = _image_folder(tmp_path / "data", ["one", "two", "three"])
    held = _image_folder(tmp_path / "held", ["four"])
    out = tmp_path / "out" / "lora.safetensors"
    common = ["--model", "unused", "--data", str(data), "--validation", str(held), "--out", str(out),
              "--resolution", "64", "--rank", "4", "--lr", "1e-2", "--warmup", "0", "--validate-every", "2",
              "--checkpoint-every", "2", "--dtype", "fp32"]
    encoders = []

    def make_encoder(family):
        encoders.append(family)
        return sc_testpack.StandInEncoder(FAMILY)

    cli.train(cli.parse_args(common + ["--steps", "4"]), tr, sc_testpack.build_model_patcher(FAMILY, 0), make_encoder)
    printed = capsys.readouterr()
    assert encoders == ["flux1"]  # the family's encoder, once
    assert "3 training examples" in printed.out and "1 validation examples" in printed.out
    assert "loss=" in printed.err and "s/step=" in printed.err and "val dB=" in printed.err  # the progress bar
    assert sorted(p.name for p in (tmp_path / "out" / "lora_checkpoints").iterdir()) == [
        "checkpoint_000002.safetensors", "checkpoint_000004.safetensors"]
    log = json.loads((tmp_path / "out" / "lora.log.json").read_text(encoding="utf-8"))
    assert len(log["losses"]) == 4 and [r["step"] for r in log["validation"]] == [0, 2, 4]
    assert all(math.isfinite(r["dense_psnr"]) and math.isfinite(r["sparse_psnr"]) for r in log["validation"])
    assert Image.open(tmp_path / "out" / "lora.curves.png").size[0] == 640

    # resume: continues at step 4 with the recorded losses and validations, up to 6 steps
    cli.train(cli.parse_args(common + ["--steps", "6", "--resume", "latest"]), tr,
              sc_testpack.build_model_patcher(FAMILY, 0), make_encoder)
    assert "resumed from" in capsys.readouterr().out
    log2 = json.loads((tmp_path / "out" / "lora.log.json").read_text(encoding="utf-8"))
    assert log2["losses"][:4] == log["losses"] and len(log2["losses"]) == 6
    assert [r["step"] for r in log2["validation"]] == [0, 2, 4, 6]
    _, meta = tr.load_lora_file(out)
    assert meta.steps == 6


# -- the Train node ------------------------------------------------------------------------------------------------
def _node_inputs(examples) -> tuple[list, list]:
    latents = [{"samples": ex.target} for ex in examples]
    conditioning = [[[ex.context, {"pooled_output": ex.pooled, "reference_latents": ex.references}]] for ex in examples]
    return latents, conditioning


def _run_node(steps: int, examples, held_out, **optional):
    from sparse_context.nodes.train import SparseContextTrainLora

    latents, cond = _node_inputs(examples)
    v_latents, v_cond = _node_inputs(held_out)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return SparseContextTrainLora.execute(
            model=[optional.pop("model")], latents=latents, conditioning=cond, steps=[steps], learning_rate=[1e-2],
            rank=[4], alpha=[4.0], targets=["attention_mlp"], keep_min=[0.1], keep_max=[1.0], dense_share=[0.1],
            recommended_keep_ratio=[0.25], seed=[0], save_dtype=["fp32"], filename_prefix=["node_test/lora"],
            validation_latents=v_latents, validation_conditioning=v_cond,
            **{k: [v] for k, v in optional.items()})


def test_train_node_shows_progress_and_curves_and_resumes_after_a_cancel(tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import sc_testpack

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    encoder = sc_testpack.StandInEncoder(FAMILY)
    examples = tr.load_example_folder(_image_folder(tmp_path / "data", ["a", "b"]), encoder, 64)
    held_out = tr.load_example_folder(_image_folder(tmp_path / "held", ["c"]), encoder, 64)
    updates = []

    def hook(value, total, preview, node_id=None):
        updates.append((value, total, preview))
        if cancel_at is not None and value == cancel_at:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    cancel_at = 3
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run_node(6, examples, held_out, model=sc_testpack.build_model_patcher(FAMILY, 0), validate_every=2,
                  checkpoint_every=5, resume=False)
    checkpoints = tmp_path / "sparse_context_checkpoints" / "node_test" / "lora"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint_000003.safetensors"]  # saved on cancel
    assert [u[0] for u in updates] == [0, 1, 2, 3] and {u[1] for u in updates} == {6}

    cancel_at, updates[:] = None, []
    out = _run_node(6, examples, held_out, model=sc_testpack.build_model_patcher(FAMILY, 0), validate_every=2,
                    checkpoint_every=5, resume=True)
    model, lora_name, keep, curves = out.args
    text = out.ui["text"][0]
    print("\n" + text)
    assert "after 6 steps (resumed from checkpoint_000003.safetensors)" in text
    assert "Validation (held-out examples), one-step x0 PSNR dense" in text
    assert [u[0] for u in updates] == [3, 4, 5, 6]  # the bar starts where the checkpoint left off
    previews = [u[2] for u in updates if u[2] is not None]
    assert previews and previews[-1][0] == "PNG" and previews[-1][1].size[0] == 640 and previews[-1][2] == 640
    assert (tmp_path / "loras" / lora_name).is_file() and keep == 0.25
    # the curves: two panels (loss, validation), the sparse validation curve drawn in orange
    assert curves.shape[0] == 1 and curves.shape[2] == 640 and curves.shape[1] > 400
    orange = torch.tensor([230, 120, 20]) / 255.0
    assert int(((curves[0] - orange).abs().max(-1).values < 0.02).sum()) > 20


def test_curves_image_draws_loss_and_validation():
    from sparse_context.training.plot import curves_image, image_tensor

    img = image_tensor(curves_image([1.0, 0.8, float("nan"), 0.5], [
        {"step": 0, "keep": 0.25, "dense_psnr": 10.0, "sparse_psnr": 8.0},
        {"step": 4, "keep": 0.25, "dense_psnr": 12.0, "sparse_psnr": 11.0}]))
    assert img.shape[-1] == 3 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    dark_blue = torch.tensor([20, 60, 170]) / 255.0
    assert int(((img[0] - dark_blue).abs().max(-1).values < 0.02).sum()) > 20  # the loss's running mean
    only_loss = image_tensor(curves_image([1.0, 0.5]))
    assert only_loss.shape[1] < img.shape[1]  # no validation panel
