"""The drop-robust LoRA step of both experiments: the pack's own trainer (``sparse_context.training.LoraTrainer``,
random reference-token dropping through the pack's patch) on the experiment's examples."""

from __future__ import annotations

from pathlib import Path


def train_lora(base, examples: list, cfg: dict, keep, *, seed: int, recommended_keep: float, path: Path, log,
               log_times: int = 10) -> tuple[list[float], object]:
    """Fine-tune a LoRA (rank ``cfg["lora_rank"]``, attention + MLP) on ``base`` for ``cfg["lora_steps"]`` steps of
    ``cfg["lora_accum"]`` examples with keep ratios from ``keep``; save it at ``path``; returns (losses, config)."""
    from sparse_context.training import LoraConfig, LoraTrainer, TrainConfig

    lora_cfg = LoraConfig(rank=cfg["lora_rank"], alpha=float(cfg["lora_rank"]), targets="attention_mlp")
    train_cfg = TrainConfig(steps=cfg["lora_steps"], learning_rate=cfg["lora_lr"], warmup_steps=20,
                            grad_accumulation=cfg["lora_accum"], keep_ratios=keep, timestep_sampling="shifted",
                            seed=seed, recommended_keep_ratio=recommended_keep)
    log(f"LoRA: {len(examples)} examples, {cfg['lora_steps']} steps x {cfg['lora_accum']} examples, {keep.describe()}")
    every = max(1, cfg["lora_steps"] // log_times)
    trainer = LoraTrainer(base, lora_cfg, train_cfg)
    losses = trainer.fit(examples, progress=False,
                         callback=lambda s, loss: log(f"  LoRA step {s}/{cfg['lora_steps']} loss {loss:.4f}")
                         if s % every == 0 else None)
    trainer.save(path)
    return losses, lora_cfg
