"""Drop-robust fine-tuning for Sparse Context: a LoRA trained with random reference-token dropping.

Modules (each usable on its own):

* ``dropping``: ``KeepRatioDistribution``, the per-example keep ratio (pure torch);
* ``lora``: ``LoraConfig``, target presets, ``LoraDelta`` (a ComfyUI weight wrapper), ``attach_lora``;
* ``lora_file``: safetensors LoRA files in core's key format with metadata; safe loading, key matching;
* ``examples``: ``TrainingExample`` and its one-safetensors-file-per-example format;
* ``example_folder``: a folder of examples (image sub-folders encoded by ``ComfyEncoder``, and example files);
* ``autograd``: ``clone_saved_tensors``, exact backprop through ComfyUI's in-place residual blocks;
* ``checkpointing``: exact per-block gradient checkpointing through core's block-replacement patches;
* ``base_weights``: reading the frozen base (inference tensors, fp8) and refusing layers a LoRA cannot train;
* ``rope_autograd``: autograd-capable host kernels during training;
* ``model_call``: the training forward through the model's own ``apply_model`` (inputs built by core);
* ``memory``: the device memory a training step needs besides the base weights (what ComfyUI is told);
* ``loading``: loading the base for training within a memory budget (core's weight offload where the host has
  it, else a base that does not fit is refused);
* ``distributed``: data-parallel training over ``torch.distributed`` (torchrun);
* ``train_config``: ``TrainConfig``, the optimisation settings;
* ``resume``: training checkpoint files (LoRA, optimizer state, the run's record) and ``latest_checkpoint``;
* ``trainer``: ``LoraTrainer`` (``loss``, ``train_step``, ``evaluate``, ``validate``, ``fit``,
  ``save``, checkpoints);
* ``progress``, ``plot``: the console progress bar and the curves image.

Needs ComfyUI importable for everything that touches a model (imports are lazy where possible).
"""

from . import distributed
from .dropping import DENSE_ONLY, KeepRatioDistribution
from .example_folder import ComfyEncoder, ImageExample, find_image_examples, load_example_folder
from .examples import TrainingExample, examples_from_comfy, load_example, save_example
from .lora import PRESET_NAMES, TARGET_PRESETS, LoraConfig, LoraDelta, LoraSet, attach_lora
from .lora_file import LoraMatch, LoraMetadata, apply_lora, load_lora_file, match_lora, read_header, save_lora
from .resume import latest_checkpoint
from .train_config import TrainConfig
from .trainer import LoraTrainer, sparse_run_for

__all__ = [
    "distributed",
    "DENSE_ONLY",
    "ComfyEncoder",
    "ImageExample",
    "PRESET_NAMES",
    "TARGET_PRESETS",
    "KeepRatioDistribution",
    "LoraConfig",
    "LoraDelta",
    "LoraMatch",
    "LoraMetadata",
    "LoraSet",
    "LoraTrainer",
    "TrainConfig",
    "TrainingExample",
    "apply_lora",
    "attach_lora",
    "examples_from_comfy",
    "find_image_examples",
    "latest_checkpoint",
    "load_example",
    "load_example_folder",
    "load_lora_file",
    "match_lora",
    "read_header",
    "save_example",
    "save_lora",
    "sparse_run_for",
]
