"""The memory the trainer tells ComfyUI (``LoraTrainer.training_memory``, ``training.memory``) against what a training
step really allocates, counted per storage by the training benchmark's counter (``AllocatedBytes``), on small real
ComfyUI models (FLUX.1 Kontext and FLUX.2 shaped, built like the benchmark's; tiny Qwen-Image-Edit from the test
pack), with gradient checkpointing on and off, dense and at keep 0.25.

Run with ``-s`` to see the numbers."""

from __future__ import annotations

import pytest
import torch
from sc_harness.scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

#: The estimate may be this many times the measured peak at most (and never below it).
MAX_FACTOR = 3.0


def _bench():
    return load_script("benchmarks/bench_training.py", "sc_bench_training")


def _sizes():
    b = _bench()
    return {  # two double + two single blocks, hidden 64; 16 text + 144 target + 144 reference tokens
        "flux": b.Size("flux", hidden=64, heads=2, depth=2, single=2, context_dim=32, text_tokens=16, grid=12),
        "flux2": b.Size("flux2", hidden=64, heads=2, depth=2, single=2, context_dim=32, text_tokens=16, grid=12),
    }


def _trainer_and_example(model: str, keep: float, checkpointing: bool):
    import sparse_context.training as tr

    keeps = tr.DENSE_ONLY if keep >= 1.0 else tr.KeepRatioDistribution(kind="fixed", low=keep, dense_share=0.0)
    config = tr.TrainConfig(steps=2, keep_ratios=keeps, gradient_checkpointing=checkpointing)
    if model == "qwen_image_edit":  # the test pack's tiny model, a 128x128 px target and reference (16x16 tokens)
        import sc_testpack

        mp = sc_testpack.build_model_patcher(model, 0)
        context, _ = sc_testpack.make_conditioning(model, 5, tokens=16)[0]
        ref = sc_testpack.make_latent(model, 3, 256, 256)
        example = tr.TrainingExample(ref.flip(1).clone(), [ref], context, None)
        return tr.LoraTrainer(mp, tr.LoraConfig(rank=8, alpha=8.0), config), example
    size = _sizes()[model]
    mp = _bench().build_model(size, torch.device("cpu"), torch.float32, fp8=False)
    return tr.LoraTrainer(mp, tr.LoraConfig(rank=16, alpha=16.0, targets="attention_mlp"), config), _bench().example(size)


CASES = [("flux", 1.0, False), ("flux", 1.0, True), ("flux", 0.25, True), ("flux", 0.25, False),
         ("flux2", 1.0, True), ("flux2", 0.25, False), ("qwen_image_edit", 1.0, True), ("qwen_image_edit", 1.0, False)]


@pytest.mark.parametrize(("model", "keep", "checkpointing"), CASES)
def test_the_memory_estimate_bounds_a_steps_allocations_within_a_factor(model, keep, checkpointing, capsys):
    trainer, example = _trainer_and_example(model, keep, checkpointing)
    estimate = trainer.training_memory(example)
    peak = 0
    with trainer.session():
        for _ in range(2):  # the first step also creates AdamW's moments
            with _bench().AllocatedBytes() as counter:
                trainer.train_step([example])
            peak = max(peak, counter.peak)
    with capsys.disabled():
        print(f"\n{model} keep {keep} checkpointing {checkpointing}: {estimate.tokens} tokens, estimate "
              f"{estimate.total / 2**20:.2f} MiB, measured peak {peak / 2**20:.2f} MiB ({estimate.total / peak:.2f}x)")
    assert peak <= estimate.total <= MAX_FACTOR * peak


def test_the_estimate_follows_the_settings_and_is_what_the_trainer_asks_core_for():
    import sparse_context.training as tr

    on, example = _trainer_and_example("flux", 1.0, True)
    off, _ = _trainer_and_example("flux", 1.0, False)
    sparse, _ = _trainer_and_example("flux", 0.25, True)
    dense_on, dense_off, sparse_on = (t.training_memory(example) for t in (on, off, sparse))
    # 16 text + 144 target + 144 (36 kept) reference tokens (patch 2 on a 24x24 latent)
    assert (dense_on.tokens, sparse_on.tokens) == (304, 196)
    assert dense_on.total < dense_off.total / 2 and sparse_on.total < dense_on.total
    assert dense_on.kept_inputs > 0 == dense_off.kept_inputs
    lora = sum(p.numel() * p.element_size() for p in on.lora.parameters())
    assert dense_on.lora == 4 * lora  # parameters, gradients and AdamW's two moments
    # a distribution that can draw dense examples is sized for them
    mixed = tr.LoraTrainer(on.base, tr.LoraConfig(rank=16, alpha=16.0, targets="attention_mlp"),
                           tr.TrainConfig(steps=1, keep_ratios=tr.KeepRatioDistribution(low=0.1, high=0.3,
                                                                                        dense_share=0.1)))
    assert mixed.training_memory(example).tokens == 304
    on.fit([example], steps=1, progress=False)
    assert on.memory_required == dense_on.total
