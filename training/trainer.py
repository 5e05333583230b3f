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
The model's other inputs (text context, pooled vector, guidance, reference latents scaled by
``process_latent_in``, FLUX.2's text padding) come from the model's own ``extra_conds``, as in sampling.

Typical use::

    trainer = LoraTrainer(model_patcher, LoraConfig(rank=16), TrainConfig(steps=2000))
    losses = trainer.fit(examples)            # list of TrainingExample
    trainer.save("my_lora.safetensors")
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..selectors import Budget
from ..sparse_attention import RUN_KEY, SparseContextConfig, SparseContextPatch, apply_sparse_context
from .autograd import clone_saved_tensors
from .dropping import KeepRatioDistribution
from .examples import TrainingExample
from .family import architecture, base_family
from .host_ops import differentiable_host_ops
from .lora import LoraConfig, attach_lora, detach_lora
from .lora_file import LoraMetadata, pack_version, save_lora

log = logging.getLogger("SparseContext.training")
log.setLevel(logging.INFO)  # stays audible while the patch's per-run INFO lines are muted during training

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "shifted")
CHECKPOINT_KEY = "sparse_context.checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        learning_rate: AdamW learning rate (after ``warmup_steps`` of linear warm-up).
        weight_decay: AdamW weight decay.
        grad_accumulation: examples per optimizer step (each example is its own forward; batch 1).
        max_grad_norm: gradient clipping (None = off).
        keep_ratios: distribution of the per-example keep ratio.
        timestep_sampling: ``"logit_normal"`` (sigma = sigmoid(N(0, 1)), as FLUX / SD3 trainers use),
            ``"uniform"`` (sigma ~ U(0, 1)) or ``"shifted"`` (uniform through the model's own sigma shift).
        seed: seeds the LoRA init and every per-step draw (example order, keep ratio, kept tokens, sigma,
            noise); a resumed run draws exactly what the uninterrupted run would have.
        compute_dtype: dtype of the model inputs (None = the model's compute dtype).
        lora_dtype: dtype of the LoRA parameters while training (float32 recommended).
        recommended_keep_ratio: written to the LoRA's metadata; the loader outputs it for Apply Sparse
            Context. Clamped into the trained range.
    """

    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    keep_ratios: KeepRatioDistribution = field(default_factory=KeepRatioDistribution)
    timestep_sampling: str = "logit_normal"
    seed: int = 0
    compute_dtype: torch.dtype | None = None
    lora_dtype: torch.dtype = torch.float32
    recommended_keep_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.steps < 0 or self.grad_accumulation < 1 or self.warmup_steps < 0:
            raise ValueError("steps >= 0, warmup_steps >= 0 and grad_accumulation >= 1 are required")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate: expected a finite value > 0, got {self.learning_rate}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling: expected one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}")
        if not 0.0 < self.recommended_keep_ratio <= 1.0:
            raise ValueError(f"recommended_keep_ratio: expected a value in (0, 1], got {self.recommended_keep_ratio}")


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (same draws on every device)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def sparse_run_for(keep_ratio: float, seed: int):
    """The ``SparseRun`` of one training forward: random ``keep_ratio`` of every reference, exact count
    (bucket 1), or the patch disabled when ``keep_ratio >= 1``."""
    if keep_ratio >= 1.0:
        config = SparseContextConfig(enabled=False)
    else:
        config = SparseContextConfig(budget=Budget(mode="ratio", ratio=float(keep_ratio)), rule="random",
                                     bucket=1, seed=int(seed))
    return SparseContextPatch(config).new_run()


class LoraTrainer:
    """Trains a drop-robust LoRA on a ComfyUI ``ModelPatcher`` (which is left untouched).

    Attributes:
        model: the training clone (sparse patch + LoRA weight wrappers).
        lora: the ``LoraSet`` being trained.
        step: optimizer steps done.
        losses: training loss per optimizer step.
        last_report: the sparse patch's report of the latest forward (kept tokens per reference).
    """

    def __init__(self, model_patcher, lora: LoraConfig | None = None, config: TrainConfig | None = None):
        self.config = config or TrainConfig()
        self.lora_config = lora or LoraConfig()
        self.base = model_patcher
        self.family, self.family_name, arch = base_family(model_patcher)
        self.architecture = architecture(model_patcher)
        sparse = apply_sparse_context(model_patcher, SparseContextConfig(rule="random", bucket=1))
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; trainable tensors must not be
            self.model, self.lora = attach_lora(sparse, self.lora_config, arch, seed=self.config.seed,
                                                dtype=self.config.lora_dtype)
            self.optimizer = torch.optim.AdamW(list(self.lora.parameters()), lr=self.config.learning_rate,
                                               weight_decay=self.config.weight_decay)
        self.step = 0
        self.losses: list[float] = []
        self.last_report: dict | None = None
        self._depth = 0
        self._dm = None
        self._options: dict | None = None
        self._device = None

    # -- model session -------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[LoraTrainer]:
        """Load the training clone through ComfyUI's model management (as core's training node does) and
        unload it afterwards. Re-entrant; ``train_step``/``evaluate`` open one when none is active."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        import comfy.model_management as mm
        import comfy.patcher_extension as pe

        sparse_log = logging.getLogger("SparseContext")
        old_level = sparse_log.level
        with torch.inference_mode(False):
            mm.load_models_gpu([self.model], memory_required=1e20, force_full_load=True)
            dm = self.model.model.diffusion_model
            _ordinary_tensors(dm)
            grad_flags = {n: p.requires_grad for n, p in dm.named_parameters()}
            dm.requires_grad_(False)
            for p in self.lora.parameters():
                p.requires_grad_(True)
            options = pe.copy_nested_dicts(self.model.model_options.get("transformer_options", {}))
            options["wrappers"] = pe.copy_nested_dicts(self.model.wrappers)
            self._dm, self._options, self._device = dm, options, self.model.load_device
            self._depth = 1
            sparse_log.setLevel(max(old_level, logging.WARNING))  # one "kept tokens" line per step is noise
            try:
                yield self
            finally:
                sparse_log.setLevel(old_level)
                self._depth = 0
                self._dm = self._options = None
                mm.free_memory(1e30, self.model.load_device)  # unloads the clone: object patches restored
                detach_lora(dm, self.lora)
                for n, p in dm.named_parameters():
                    p.requires_grad_(grad_flags.get(n, p.requires_grad))

    # -- one forward -----------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        if self.config.compute_dtype is not None:
            return self.config.compute_dtype
        base = self.model.model
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

    def loss(self, example: TrainingExample, keep_ratio: float, seed: int, sigma: float | None = None,
             clone_saved: bool = True) -> torch.Tensor:
        """Flow-matching loss of one example with ``keep_ratio`` of its reference tokens (random subset
        drawn from ``seed``; 1.0 = dense). Noise and sigma (unless given) are drawn from ``seed`` too.
        Builds the autograd graph when grad mode is on (``clone_saved=False`` only to show why it is needed)."""
        with self.session():
            gen = _generator(seed, 17)
            dtype, device = self._dtype(), self._device
            base = self.model.model
            x0 = base.process_latent_in(example.target.to(device=device, dtype=torch.float32))
            noise = torch.randn(example.target.shape, generator=gen).to(device)
            s = self._sample_sigma(gen) if sigma is None else torch.tensor([float(sigma)])
            s = s.to(device)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            x_t = (1.0 - s.view(shape)) * x0 + s.view(shape) * noise
            target = noise - x0
            x_in, timestep, kwargs = self._model_inputs(example, x_t, s, device, dtype)
            options = dict(self._options)
            run = sparse_run_for(keep_ratio, seed)
            options[RUN_KEY] = run
            with differentiable_host_ops(), ExitStack() as stack:
                if clone_saved and torch.is_grad_enabled():
                    stack.enter_context(clone_saved_tensors())
                pred = self._dm(x_in, timestep, transformer_options=options, **kwargs)
            self.last_report = run.report
            loss_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
            return torch.nn.functional.mse_loss(pred.to(loss_dtype), target.to(loss_dtype))

    def _model_inputs(self, example: TrainingExample, x_t: torch.Tensor, sigma: torch.Tensor, device, dtype):
        """Diffusion-model inputs as ComfyUI's ``BaseModel._apply_model`` builds them from a conditioning."""
        base = self.model.model
        cond = dict(cross_attn=example.context.to(device), pooled_output=None if example.pooled is None
                    else example.pooled.to(device), reference_latents=[r.to(device) for r in example.references],
                    noise=x_t, device=device)
        if example.guidance is not None:
            cond["guidance"] = example.guidance
        if example.reference_method is not None:
            cond["reference_latents_method"] = example.reference_method
        kwargs = {}
        for name, c in base.extra_conds(**cond).items():
            value = c.process_cond(batch_size=x_t.shape[0], device=device, area=None).cond
            if isinstance(value, list):
                value = [_cast(v, device, dtype) for v in value]
            else:
                value = _cast(value, device, dtype)
            kwargs[name] = value
        x_in = x_t
        concat = kwargs.pop("c_concat", None)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in)], dim=1)
        kwargs["context"] = kwargs.pop("c_crossattn", None)
        kwargs["control"] = None
        ms = self.model.get_model_object("model_sampling")
        timestep = ms.timestep(sigma).float()
        return x_in.to(dtype), timestep, kwargs

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
        """One optimizer step over ``grad_accumulation`` examples; returns the mean loss."""
        if not examples:
            raise ValueError("examples: at least one training example is required")
        c = self.config
        with self.session(), torch.enable_grad():
            lr = c.learning_rate * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.learning_rate
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for a in range(c.grad_accumulation):
                index, keep, seed = self._micro_draw(self.step * c.grad_accumulation + a, len(examples))
                loss = self.loss(examples[index], keep, seed)
                (loss / c.grad_accumulation).backward()
                total += float(loss.detach())
            if c.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.lora.parameters()), c.max_grad_norm)
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

    def fit(self, examples: Sequence[TrainingExample], steps: int | None = None,
            callback: Callable[[int, float], None] | None = None, checkpoint_every: int = 0,
            checkpoint_dir: str | Path | None = None, progress: bool = True) -> list[float]:
        """Train until ``steps`` optimizer steps are done in total (default ``config.steps``; a resumed
        trainer continues from ``self.step``). Returns the losses of all steps."""
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; those tensors cannot be saved
            examples = [ex.detached() for ex in examples]
        total = self.config.steps if steps is None else steps
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=self.step, desc="Sparse Context LoRA", dynamic_ncols=True)
            except ImportError:
                bar = None
        with self.session():
            while self.step < total:
                loss = self.train_step(examples)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if callback is not None:
                    callback(self.step, loss)
                if checkpoint_every and checkpoint_dir is not None and self.step % checkpoint_every == 0:
                    path = self.save_checkpoint(Path(checkpoint_dir) / f"checkpoint_{self.step:06d}.safetensors")
                    log.info("SparseContext: checkpoint %s (step %d, loss %.4f)", path, self.step, loss)
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
        """LoRA + optimizer state + step + losses, as safetensors (resumable with ``load_checkpoint``)."""
        from safetensors.torch import save_file

        tensors = dict(self.lora.state_dict())
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optimizer.{index}.{name}"] = t.detach().to("cpu").contiguous()
        header = self.metadata().to_header()
        header[CHECKPOINT_KEY] = json.dumps({
            "step": self.step, "losses": self.losses, "lora": asdict(self.lora_config),
            "train": {k: v for k, v in asdict(replace(self.config, compute_dtype=None)).items()
                      if k not in ("keep_ratios", "lora_dtype", "compute_dtype")},
        })
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=header)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``save_checkpoint``'s file: LoRA weights, optimizer state, step and losses."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if CHECKPOINT_KEY not in header:
            raise ValueError(f"{Path(path).name}: not a Sparse Context training checkpoint")
        info = json.loads(header[CHECKPOINT_KEY])
        if info["lora"] != asdict(self.lora_config):
            raise ValueError(f"{Path(path).name}: checkpoint LoRA settings {info['lora']} differ from {asdict(self.lora_config)}")
        self.lora.load_state_dict(tensors)
        opt = self.optimizer.state_dict()
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        opt["state"] = state
        self.optimizer.load_state_dict(opt)
        self.step = int(info["step"])
        self.losses = [float(x) for x in info["losses"]]


def _ordinary_tensors(module: torch.nn.Module) -> None:
    """Replace the module's inference-mode parameters and buffers by equal ordinary tensors, one at a time.

    Models built or loaded inside a ComfyUI node run (``torch.inference_mode``) hold inference tensors, which
    autograd refuses to save for backward even when they need no gradient. Values, devices and dtypes stay
    the same; ComfyUI's weight backups and LoRA patching work on the replacements as before.
    """
    with torch.inference_mode(False):
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()


def _cast(value, device, dtype):
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return value
