"""``SCTest_StepTimer``: times every sampling step inside ComfyUI and sends the times to the client.

The demo used to time steps from ComfyUI's websocket ``progress`` events; since 0.10 core throttles them
(the first and last step, otherwise at most one per 100 ms), so steps of a few ms are invisible to a
client. This node measures where the steps run instead, through official hooks on a clone of the model:
a PREDICT_NOISE wrapper times each model evaluation of the sampler (one per step for euler), an
OUTER_SAMPLE wrapper gives each sampling run its own list and sends ``{"label", "step_s", "sampling_s",
"prompt_id"}`` as the websocket event ``sctest.step_times`` to the client that queued the prompt.

Tests and demo only; never shipped (the test pack is in .comfyignore).
"""

from __future__ import annotations

import functools
import time

import torch
from comfy_api.latest import io

from .pack_node import pack_node

KEY = "sctest_step_timer"
EVENT = "sctest.step_times"


def _finish(out) -> None:
    """Wait for the device, so a step's time is its work and not only its launch."""
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)


def predict_noise_wrapper(executor, *args, **kwargs):
    run = executor.class_obj.model_options.get("transformer_options", {}).get(KEY)
    start = time.perf_counter()
    out = executor(*args, **kwargs)
    if run is not None:
        _finish(out)
        run.append(time.perf_counter() - start)
    return out


def outer_sample_wrapper(label: str, executor, *args, **kwargs):
    """A fresh list of step times for this sampling run, sent to the client when the run ends."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    run: list[float] = []
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options["transformer_options"][KEY] = run
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        _finish(out)
        sampling_s = time.perf_counter() - start
    finally:
        guider.model_options = original
    _send({"label": label, "step_s": run, "sampling_s": sampling_s})
    return out


def _send(data: dict) -> None:
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(EVENT, {**data, "prompt_id": getattr(server, "last_prompt_id", None)}, server.client_id)


@pack_node("SCTest_StepTimer",
           "Times each sampling step of the model inside ComfyUI and sends the times to the client as the websocket "
           f"event {EVENT!r} (tests and demo only).",
           [io.Model.Input("model", tooltip="Model to time."),
            io.String.Input("label", default="run", tooltip="Names the runs of this model in the event.")],
           [io.Model.Output()])
def StepTimer(model, label: str) -> io.NodeOutput:
    import comfy.patcher_extension

    clone = model.clone()
    wrappers = comfy.patcher_extension.WrappersMP
    clone.remove_wrappers_with_key(wrappers.OUTER_SAMPLE, KEY)
    clone.remove_wrappers_with_key(wrappers.PREDICT_NOISE, KEY)
    clone.add_wrapper_with_key(wrappers.PREDICT_NOISE, KEY, predict_noise_wrapper)
    clone.add_wrapper_with_key(wrappers.OUTER_SAMPLE, KEY, functools.partial(outer_sample_wrapper, label))
    return io.NodeOutput(clone)
