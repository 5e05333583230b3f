"""The drop-robust LoRA fine-tune: rectified-flow loss with random reference-token dropping.

Every training example draws a keep ratio (``KeepRatioDistribution``) and runs through THE SAME patch
that inference uses (``apply_sparse_context``): for that forward, a fresh ``SparseRun`` with
``Budget("ratio", r)``, ``rule="random"``, ``bucket=1`` and a per-example seed keeps a random subset of
each reference's tokens with their original position ids. Dense examples (r = 1) run the patch disabled.

Loss (how FLUX and Qwen-Image are trained, in ComfyUI's conventions): with ``x0`` the target latent after
``model.process_latent_in``, ``noise ~ N(0, I)`` and ``sigma`` in (0, 1):
``x_t = (1 - sigma) x0 + sigma noise`` (``CONST.noise_scaling``); the diffusion model is called with
``timestep = model_sampling.timestep(sigma)`` (= sigma for Flux and Qwen-Image) and predicts the velocity
``noise - x0`` (ComfyUI's ``calculate_denoised`` is ``x_t - sigma * output``); loss = MSE.
The forward is the model's own ``apply_model`` on inputs core's sampler functions build from the example's
conditioning (``training.model_call``); the loss takes the diffusion model's raw output.

Data-parallel over ``torch.distributed`` (``training.distributed``): each rank runs its share of every step's
examples, gradients are summed over the ranks, and rank 0 alone writes checkpoints.

Typical use::

    trainer = LoraTrainer(model_patcher, LoraConfig(rank=16), TrainConfig(steps=2000))
    losses = trainer.fit(examples)            # list of TrainingExample
    trainer.save("my_lora.safetensors")
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..selectors import Budget
from ..sparse_attention import RUN_KEY, SparseContextConfig, SparseContextPatch, apply_sparse_context
from ..sparse_attention.families import match_family
from ..sparse_attention.patch import attention_width
from . import distributed, resume
from .autograd import clone_saved_tensors
from .base_weights import (
    check_lora_reaches_weights,
    guard_inference_tensors,
    read_through_copy,
    remove_weight_functions,
)
from .checkpointing import add_block_checkpointing, blocks
from .examples import TrainingExample
from .family import architecture, base_family
from .loading import load_for_training, unload
from .lora import PREFIX, LoraConfig, attach_lora
from .lora_file import LoraMetadata, pack_version, save_lora
from .memory import TrainingMemory, quadratic_attention, sequence_tokens
from .memory import estimate as estimate_memory
from .model_call import CAPTURE_KEY, OutputCapture, apply_model_inputs
from .progress import ConsoleProgress
from .rope_autograd import differentiable_rope
from .train_config import TrainConfig

log = logging.getLogger("SparseContext.training")

#: Noise levels of the validation's one-step x0 estimates (fixed, so curves compare across steps).
VALIDATION_SIGMAS = (0.25, 0.5, 0.75)


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (same draws on every device)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def sparse_run_for(keep_ratio: float, seed: int):
    """The ``SparseRun`` of one training forward: random ``keep_ratio`` of every reference, exact count
    (bucket 1), or the patch disabled when ``keep_ratio >= 1``. It does not log its kept counts."""
    if keep_ratio >= 1.0:
        config = SparseContextConfig(enabled=False)
    else:
        config = SparseContextConfig(budget=Budget(mode="ratio", ratio=float(keep_ratio)), rule="random",
                                     bucket=1, seed=int(seed))
    run = SparseContextPatch(config).new_run()
    run.log_kept = False
    return run


@dataclass
class _Forward:
    """One training forward: the model's velocity prediction and what it is compared with."""

    pred: torch.Tensor  # model output (velocity)
    target: torch.Tensor  # noise - x0
    x0: torch.Tensor  # the clean target latent (after process_latent_in)
    x_t: torch.Tensor  # the noised input
    sigma: torch.Tensor  # (1,)


class LoraTrainer:
    """Trains a drop-robust LoRA on a ComfyUI ``ModelPatcher`` (which is left untouched).

    Attributes:
        model: the training clone (sparse patch + LoRA weight wrappers + block checkpointing).
        lora: the ``LoraSet`` being trained.
        step: optimizer steps done.
        losses: training loss per optimizer step.
        validation: ``validate`` records (step, keep, dense_psnr, sparse_psnr) made during ``fit``.
        last_report: the sparse patch's report of the latest forward (kept tokens per reference).
    """

    def __init__(self, model_patcher, lora: LoraConfig | None = None, config: TrainConfig | None = None):
        self.config = config or TrainConfig()
        self.lora_config = lora or LoraConfig()
        self.base = model_patcher
        self.family, self.family_name, self.arch = base_family(model_patcher)
        self.architecture = architecture(model_patcher)
        import comfy.patcher_extension as pe

        sparse = apply_sparse_context(model_patcher, SparseContextConfig(rule="random", bucket=1))
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trainable tensors must not be
            self.model, self.lora = attach_lora(sparse, self.lora_config, self.arch, seed=self.config.seed,
                                                dtype=self.config.lora_dtype)
            guard_inference_tensors(self.model, {f"{PREFIX}{name}.weight" for name in self.lora.deltas})
            if self.config.gradient_checkpointing:
                add_block_checkpointing(self.model, self.arch, {name: [d.lora_down, d.lora_up]
                                                                for name, d in self.lora.deltas.items()})
            self._capture = OutputCapture()
            self.model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, CAPTURE_KEY, self._capture)
            for p in self.lora.parameters():
                p.requires_grad_(True)
            self.optimizer = torch.optim.AdamW(list(self.lora.parameters()), lr=self.config.learning_rate,
                                               weight_decay=self.config.weight_decay)
        self.step = 0
        self.losses: list[float] = []
        self.validation: list[dict] = []
        self.last_report: dict | None = None
        self.memory_required = 0.0  # training bytes the session asks core to make room for (set by fit)
        self.noise_shape: tuple[int, ...] = (1,)  # the largest target latent's shape (set by fit; core's loading takes it)
        self.offloading = False  # whether core may keep base weights off the device (set by the session)
        self._checked = False
        self._depth = 0
        self._dm = None
        self._options: dict | None = None
        self._device = None

    # -- model session -------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[LoraTrainer]:
        """Load the training clone through ComfyUI's model management and unload it (only it) afterwards.
        Re-entrant; ``train_step``/``evaluate``/``validate`` open one when none is active. The first session
        checks that every adapted layer applies ComfyUI's weight function (``check_lora_reaches_weights``)."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        import comfy.patcher_extension as pe

        with torch.inference_mode(False):
            self.offloading = load_for_training(self.model, self.memory_required, self.noise_shape,
                                                self.config.memory_budget, self.config.weight_offload)
            dm = self.model.model.diffusion_model
            options = pe.copy_nested_dicts(self.model.model_options.get("transformer_options", {}))
            options["wrappers"] = pe.copy_nested_dicts(self.model.wrappers)
            self._dm, self._options, self._device = dm, options, self.model.load_device
            self._depth = 1
            try:
                if not self._checked:
                    check_lora_reaches_weights(dm, self.lora, self._device, self._dtype())
                    self._checked = True
                yield self
            finally:
                self._depth = 0
                self._dm = self._options = None
                unload(self.model)  # object patches restored by core
                remove_weight_functions(dm, [*self.lora.deltas.values(), read_through_copy])

    def training_memory(self, example: TrainingExample) -> TrainingMemory:
        """Device memory one training step on ``example`` needs besides the base weights (``training.memory``):
        from the model's blocks, the sequence at the largest keep ratio the distribution draws, the batch, the
        compute dtype, the LoRA and whether gradient checkpointing is on."""
        dm = self.model.get_model_object("diffusion_model")
        # the text as the model sees it: core's own input building may pad it (FLUX.2 to 512 tokens)
        cpu = torch.device("cpu")
        _, inputs = apply_model_inputs(self.model.model, example, torch.zeros(example.target.shape), torch.ones(1), cpu)
        text = inputs["c_crossattn"].shape[1] if "c_crossattn" in inputs else example.context.shape[1]
        arch = self.architecture  # Krea 2 names its sizes features/heads, Z-Image dim/n_heads
        patch = match_family(dm).family.patch_size(dm)  # Krea 2's attribute is ``patch``
        tokens = sequence_tokens(example, text, patch, self.config.keep_ratios.largest())
        hidden = attention_width(dm)
        heads = int(arch.get("num_heads") or arch.get("num_attention_heads") or arch.get("heads") or arch["n_heads"])
        lora_bytes = sum(p.numel() * p.element_size() for p in self.lora.parameters())
        return estimate_memory([(m, kind == "double_block") for kind, _, _, m in blocks(dm, self.arch)], hidden,
                               heads, tokens, int(example.target.shape[0]), self._dtype(), lora_bytes,
                               self.config.gradient_checkpointing, quadratic_attention())

    # -- one forward -----------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        """The dtype the model computes in (what ``apply_model`` casts its inputs to)."""
        base = self.model.model
        if hasattr(base, "get_dtype_inference"):
            return base.get_dtype_inference()
        return base.manual_cast_dtype or base.get_dtype()

    def _sample_sigma(self, gen: torch.Generator) -> torch.Tensor:
        kind = self.config.timestep_sampling
        if kind == "logit_normal":
            u = torch.sigmoid(torch.randn((1,), generator=gen, dtype=torch.float64))
        else:
            u = torch.rand((1,), generator=gen, dtype=torch.float64)
        u = u.clamp(1e-4, 1 - 1e-4).float()
        if kind == "shifted":
            ms = self.model.get_model_object("model_sampling")
            u = ms.sigma(ms.timestep(u)).float()
        return u

    def _forward(self, example: TrainingExample, keep_ratio: float, seed: int, sigma: float | None,
                 clone_saved: bool) -> _Forward:
        with self.session():
            gen = _generator(seed, 17)
            device = self._device
            base = self.model.model
            x0 = base.process_latent_in(example.target.to(device=device, dtype=torch.float32))
            noise = torch.randn(example.target.shape, generator=gen).to(device)
            s = self._sample_sigma(gen) if sigma is None else torch.tensor([float(sigma)])
            s = s.to(device)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            x_t = (1.0 - s.view(shape)) * x0 + s.view(shape) * noise
            x_in, kwargs = apply_model_inputs(base, example, x_t, s, device)
            options = dict(self._options)
            run = sparse_run_for(keep_ratio, seed)  # always an explicit run: never the patch's default
            options[RUN_KEY] = run
            with differentiable_rope(), ExitStack() as stack:
                if clone_saved and torch.is_grad_enabled() and not self.config.gradient_checkpointing:
                    stack.enter_context(clone_saved_tensors())
                base.apply_model(x_in, s, transformer_options=options, **kwargs)
            pred = self._capture.take()
            self.last_report = run.report
            return _Forward(pred, noise - x0, x0, x_t, s)

    def loss(self, example: TrainingExample, keep_ratio: float, seed: int, sigma: float | None = None,
             clone_saved: bool = True) -> torch.Tensor:
        """Flow-matching loss of one example with ``keep_ratio`` of its reference tokens (random subset
        drawn from ``seed``; 1.0 = dense). Noise and sigma (unless given) are drawn from ``seed`` too.
        Builds the autograd graph when grad mode is on. Without gradient checkpointing the graph is recorded
        with saved tensors cloned (``clone_saved=False`` only to show why that is needed); with it, each block
        does that itself in its recompute."""
        f = self._forward(example, keep_ratio, seed, sigma, clone_saved)
        loss_dtype = torch.float64 if f.pred.dtype == torch.float64 else torch.float32
        return torch.nn.functional.mse_loss(f.pred.to(loss_dtype), f.target.to(loss_dtype))

    # -- training --------------------------------------------------------------------------------
    def _micro_draw(self, micro: int, n_examples: int) -> tuple[int, float, int]:
        """(example index, keep ratio, seed) of micro-step ``micro`` (epoch-wise shuffled order)."""
        epoch, pos = divmod(micro, n_examples)
        order = torch.randperm(n_examples, generator=_generator(self.config.seed, 1, epoch))
        gen = _generator(self.config.seed, 2, micro)
        keep = self.config.keep_ratios.sample(gen)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return int(order[pos]), keep, seed

    def train_step(self, examples: Sequence[TrainingExample]) -> float:
        """One optimizer step over ``grad_accumulation`` examples (in a distributed job: this rank's share of
        them, gradients summed over the ranks); returns the mean loss of the whole step."""
        if not examples:
            raise ValueError("examples: at least one training example is required")
        c = self.config
        group = distributed.current()
        params = list(self.lora.parameters())
        with self.session(), torch.enable_grad():
            lr = c.learning_rate * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.learning_rate
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
            total, error, source = 0.0, None, ""
            try:
                for a in group.share(c.grad_accumulation):
                    index, keep, seed = self._micro_draw(self.step * c.grad_accumulation + a, len(examples))
                    source = examples[index].source or f"#{index}"
                    loss = self.loss(examples[index], keep, seed)
                    # only the LoRA: base weights that require grad (as models built outside ComfyUI's loaders do)
                    # get no .grad, and the shared model is not touched
                    (loss / c.grad_accumulation).backward(inputs=params)
                    total += float(loss.detach())
            except Exception as err:
                if group.world_size == 1:
                    raise
                error = err  # the other ranks must learn of it in this step's all-reduce, not hang in it
            if group.world_size > 1:
                (total,), failed = distributed.reduce_step(params, [total], error is not None, group)
                if failed:
                    self.optimizer.zero_grad(set_to_none=True)
                    where = f"step {self.step + 1}"
                    if error is not None:
                        raise distributed.StepFailed(f"training failed on rank {group.rank} at {where}, on example "
                                                     f"{source}: {type(error).__name__}: {error}") from error
                    raise distributed.RankFailed(
                        f"training stopped at {where}: rank(s) {', '.join(map(str, failed))} of {group.world_size} "
                        "failed (their output says why); the last checkpoint stays loadable")
            if c.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean = total / c.grad_accumulation
        self.losses.append(mean)
        return mean

    @torch.no_grad()
    def evaluate(self, examples: Sequence[TrainingExample], keep_ratio: float, repeats: int = 4,
                 seed: int = 12345) -> float:
        """Mean loss over ``examples`` x ``repeats`` with stratified sigmas ((j + 0.5) / repeats) and fixed
        noise and kept tokens: the same draws every call, so numbers before/after training compare."""
        with self.session():
            total = 0.0
            for i, ex in enumerate(examples):
                for j in range(repeats):
                    total += float(self.loss(ex, keep_ratio, seed + 7919 * i + j, sigma=(j + 0.5) / repeats))
            return total / (len(examples) * repeats)

    @torch.no_grad()
    def validate(self, examples: Sequence[TrainingExample], keep_ratio: float | None = None,
                 seed: int = 4242) -> dict:
        """PSNR (dB) of the model's one-step x0 estimate ``x_t - sigma * v`` against the clean target latent,
        dense and with ``keep_ratio`` (default: the recommended keep ratio) of the reference tokens, averaged
        over ``examples`` x ``VALIDATION_SIGMAS``. Fixed noise and kept tokens: records compare across steps.
        The peak of each PSNR is the target latent's own range (max - min)."""
        keep = self.metadata().recommended_keep_ratio if keep_ratio is None else float(keep_ratio)
        report = self.last_report
        record = {"step": self.step, "keep": keep}
        group = distributed.current()
        cases = [(i, j) for i in range(len(examples)) for j in range(len(VALIDATION_SIGMAS))]
        with self.session():
            sums = []
            for ratio in (1.0, keep):
                total = 0.0
                for k in group.share(len(cases)):  # in a distributed job each rank measures its share
                    i, j = cases[k]
                    f = self._forward(examples[i], ratio, seed + 7919 * i + j, VALIDATION_SIGMAS[j], clone_saved=False)
                    x0_hat = f.x_t - f.sigma.view((-1,) + (1,) * (f.x_t.ndim - 1)) * f.pred.float()
                    mse = float(torch.mean((x0_hat.double() - f.x0.double()) ** 2))
                    peak = float(f.x0.max() - f.x0.min())
                    total += 10.0 * math.log10(peak**2 / max(mse, 1e-20))
                sums.append(total)
            dense, sparse = distributed.reduce_values(sums, group, self._device)
        record["dense_psnr"], record["sparse_psnr"] = dense / len(cases), sparse / len(cases)
        self.last_report = report
        return record

    def fit(self, examples: Sequence[TrainingExample], steps: int | None = None,
            callback: Callable[[int, float], None] | None = None, checkpoint_every: int = 0,
            checkpoint_dir: str | Path | None = None, progress: bool = True,
            validation: Sequence[TrainingExample] = (), validate_every: int = 0) -> list[float]:
        """Train until ``steps`` optimizer steps are done in total (default ``config.steps``; a resumed
        trainer continues from ``self.step``). Returns the losses of all steps.

        ``callback(step, loss)`` runs after every step (progress bars; it may raise to stop, e.g. ComfyUI's
        interrupt). With ``validation`` examples and ``validate_every`` > 0, ``validate`` runs before the first
        step, every ``validate_every`` steps and after the last one; records go to ``self.validation``.
        ``checkpoint_every`` > 0 writes ``checkpoint_dir/checkpoint_<step>.safetensors`` (``save_checkpoint``).
        In a distributed job every rank calls this; losses and validations are those of the whole job, and only
        rank 0 shows progress and writes checkpoints."""
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; those tensors cannot be saved
            examples = [ex.detached() for ex in examples]
            validation = [ex.detached() for ex in validation]
        total = self.config.steps if steps is None else steps
        if examples:
            self.memory_required = float(max(self.training_memory(ex).total for ex in examples))
            self.noise_shape = tuple(max((ex.target for ex in examples), key=lambda t: t.numel()).shape)
        validating = bool(validation) and validate_every > 0
        main = distributed.current().is_main
        bar = ConsoleProgress(total, self.step) if progress and main else None
        try:
            with self.session():
                if validating and not any(r["step"] == self.step for r in self.validation):
                    self.validation.append(self.validate(validation))
                while self.step < total:
                    start = time.perf_counter()
                    loss = self.train_step(examples)
                    seconds = time.perf_counter() - start
                    if validating and (self.step % validate_every == 0 or self.step == total):
                        self.validation.append(self.validate(validation))
                    if bar is not None:
                        bar.update(self.step, loss, seconds, self.validation[-1] if self.validation else None)
                    if callback is not None:
                        callback(self.step, loss)
                    if main and checkpoint_every and checkpoint_dir is not None and self.step % checkpoint_every == 0:
                        path = self.save_checkpoint(Path(checkpoint_dir) / f"checkpoint_{self.step:06d}.safetensors")
                        log.info("SparseContext: checkpoint %s (step %d, loss %.4f)", path, self.step, loss)
        finally:
            if bar is not None:
                bar.close()
        return list(self.losses)

    # -- output ----------------------------------------------------------------------------------
    def metadata(self) -> LoraMetadata:
        dist = self.config.keep_ratios
        low = dist.low if dist.dense_share < 1.0 else 1.0
        recommended = min(max(self.config.recommended_keep_ratio, low), 1.0)
        return LoraMetadata(family=self.family, architecture=self.architecture, rank=self.lora_config.rank,
                            alpha=self.lora_config.alpha, targets=self.lora.patterns,
                            keep_ratio_distribution=json.loads(dist.to_json()), recommended_keep_ratio=recommended,
                            steps=self.step, pack_version=pack_version(), is_sparse_context=True)

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The LoRA in core's file format (see ``training.lora_file``)."""
        return self.lora.state_dict(dtype)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the LoRA with its metadata (safetensors)."""
        return save_lora(path, self.lora_state_dict(dtype), self.metadata())

    def save_checkpoint(self, path: str | Path) -> Path:
        """LoRA + optimizer state + step + losses + validation records, as safetensors (``load_checkpoint``)."""
        return resume.write(path, self.lora, self.optimizer, self.metadata().to_header(), {
            "step": self.step, "losses": self.losses, "validation": self.validation, "lora": asdict(self.lora_config),
            "world_size": distributed.current().world_size,  # for the record: any world size resumes it
            "train": {k: v for k, v in asdict(self.config).items() if k not in ("keep_ratios", "lora_dtype")},
        })

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``save_checkpoint``'s file: LoRA weights, optimizer state, step, losses, validation."""
        info = resume.read(path, self.lora, self.optimizer, asdict(self.lora_config))
        self.step = int(info["step"])
        self.losses = [float(x) for x in info["losses"]]
        self.validation = [dict(r) for r in info.get("validation", [])]
