"""Bad input never reaches the user as a raw error or a silently wrong image (issue 13): one regression test per
case the fuzz run found, in-process on the real nodes and through the real server. The random search over
every node's inputs is ``test_fuzz_server.py``."""

from __future__ import annotations

import inspect
import math

import comfy.utils
import pytest
import sc_testpack
import torch
from comfy_api.latest import io
from sc_harness.host import core_checks_v3_combos
from sc_harness.loras import lora_files, sparse_header, tiny_lora, write_lora
from sc_harness.prompts import ksampler, tiny_latent
from sparse_context.nodes import NODES
from sparse_context.nodes.apply_node import SparseContextApply
from sparse_context.nodes.common import SparseContextInputError, SparseNode
from sparse_context.nodes.lora_loader import SparseContextLoraLoader
from sparse_context.nodes.preview_node import SparseContextPreview
from sparse_context.nodes.selector_nodes import (
    SparseContextEdgeSelector,
    SparseContextGridSelector,
    SparseContextMaskSelector,
    SparseContextRandomSelector,
    SparseContextSaliencySelector,
)
from sparse_context.nodes.train import SparseContextSaveTrainingExample, SparseContextTrainLora
from sparse_context.selectors import token_grid_shape

F = "flux1_kontext"
NAN = float("nan")


def _out(node_output):
    return node_output.result[0]


def _picture(h: int, w: int, grey: bool = False) -> torch.Tensor:
    """A (1, h, w, 3) IMAGE: smooth structure (a seeded latent projected and resized), or flat grey."""
    if grey:
        return torch.full((1, h, w, 3), 0.5)
    x = torch.sigmoid(sc_testpack.make_latent(F, 2, 64, 64)[:, :3])
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear").permute(0, 2, 3, 1).contiguous()


@pytest.fixture
def loras_folder(tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


@pytest.fixture
def output_folder(tmp_path, monkeypatch):
    import folder_paths

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(out))
    return out


@pytest.fixture
def progress_calls():
    """Every ComfyUI progress-bar update (core's own hook): training steps report through it."""
    calls: list = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda *args: calls.append(args))
    yield calls
    comfy.utils.set_progress_bar_global_hook(before)


# -- selectors work on every picture size ComfyUI can produce ------------------------------------------------------
ISSUE_CASES = [  # (height, width, blur_tokens, grey): the saliency crashes of the fuzz run, then more sizes
    (16, 16, 1.0, False), (48, 48, 1.0, False), (16, 1024, 1.0, False), (256, 256, 8.0, False),
    (128, 128, 4.0, False), (48, 64, 1.0, True),
    (1, 1, 8.0, False), (1, 7, 1.0, False), (7, 1, 1.0, False), (1, 1024, 8.0, False), (1024, 1, 0.0, False),
    (17, 9, 8.0, True),
]


@pytest.mark.parametrize(("h", "w", "blur", "grey"), ISSUE_CASES, ids=[f"{h}x{w}-blur{b}{'-grey' if g else ''}"
                                                                       for h, w, b, g in ISSUE_CASES])
def test_every_selector_scores_tiny_and_thin_pictures(h, w, blur, grey):
    image = _picture(h, w, grey)
    grid = token_grid_shape(h, w)
    mask = torch.zeros(1, h, w)
    mask[:, : max(1, h // 2)] = 1.0
    selections = {
        "saliency": _out(SparseContextSaliencySelector.execute(image=image, blur_tokens=blur)),
        "edge": _out(SparseContextEdgeSelector.execute(image=image, low_threshold=0.1, high_threshold=0.2, spread=8)),
        "mask": _out(SparseContextMaskSelector.execute(mask=mask, inside=1.0, outside=0.0, dilate_tokens=32, feather_tokens=32)),
        "random": _out(SparseContextRandomSelector.execute(image=image, seed=3)),
        "grid": _out(SparseContextGridSelector.execute(image=image)),
    }
    for rule, sel in selections.items():
        assert tuple(sel.scores.shape) == grid, (rule, tuple(sel.scores.shape), grid)
        assert torch.isfinite(sel.scores).all() and (sel.scores >= 0).all(), rule
    if grey:  # a flat picture has no salient region: all zeros, not noise
        assert selections["saliency"].scores.abs().max() == 0
    elif min(grid) > 1:  # a real picture gives a real map
        assert selections["saliency"].scores.std() > 0
    preview = SparseContextPreview.execute(image, selections["saliency"], 1).result[0]
    assert preview.shape == (1, h, w, 3) and torch.isfinite(preview).all()


def test_a_side_below_one_latent_pixel_is_one_token_not_an_internal_error():
    # was: "Sparse Grid Selector: height: expected an int >= 8 px (stride // 2)" (an argument of the pure code)
    sel = _out(SparseContextGridSelector.execute(image=torch.rand(1, 4, 4, 3)))
    assert sel.scores.shape == (1, 1)
    with pytest.raises(SparseContextInputError, match=r"^Sparse Grid Selector: image: expected a non-empty tensor"):
        SparseContextGridSelector.execute(image=torch.rand(1, 0, 4, 3))


# -- NaN and inf: every float input, LoRA files, masks -------------------------------------------------------------
def _number_inputs(node) -> list:
    return [i for i in node.define_schema().inputs if isinstance(i, (io.Int.Input, io.Float.Input))]


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_every_number_input_has_finite_bounds_so_core_refuses_inf(node):
    for inp in _number_inputs(node):
        assert inp.min is not None and inp.max is not None, f"{node.__name__}.{inp.id}: no min/max"
        assert math.isfinite(inp.min) and math.isfinite(inp.max), f"{node.__name__}.{inp.id}"


def _valid_arguments(node, lora_name: str | None) -> dict:
    """Real, valid arguments for every input of ``node``, built from its schema."""
    image = _picture(64, 64)
    latent = sc_testpack.make_latent(F, 4, 64, 64)
    made = {
        "MODEL": lambda: sc_testpack.build_model_patcher(F, 1),
        "IMAGE": lambda: image,
        "MASK": lambda: torch.ones(1, 64, 64),
        "LATENT": lambda: {"samples": latent},
        "CONDITIONING": lambda: sc_testpack.make_conditioning(F, 3, references=[latent]),
        "SPARSE_SELECTION": lambda: _out(SparseContextGridSelector.execute(image=image)),
        "SPARSE_BUDGET": lambda: None,
        "VAE": lambda: None,  # optional (Sparse Context Calibrate then compares latents); no tiny VAE exists
    }
    schema = node.define_schema()
    args = {}
    for inp in schema.inputs:
        kind = str(inp.io_type)
        if kind in made:
            args[inp.id] = made[kind]()
        elif isinstance(inp, io.Combo.Input):
            args[inp.id] = lora_name if inp.id == "lora_name" else (inp.default or inp.options[0])
        elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING"):
            args[inp.id] = inp.default
        else:
            raise AssertionError(f"{node.__name__}.{inp.id}: no test value for {kind}; add one here")
    if schema.is_input_list:
        args = {k: [v] for k, v in args.items()}
    return args


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.__name__)
def test_nan_linked_out_of_range_and_unknown_options_are_refused_naming_the_input(node, loras_folder, output_folder,
                                                                                    progress_calls):
    write_lora(loras_folder / "good.safetensors", tiny_lora(sc_testpack.build_model_patcher(F, 1)), sparse_header())
    schema = node.define_schema()
    args = _valid_arguments(node, "good.safetensors")
    wrap = (lambda v: [v]) if schema.is_input_list else (lambda v: v)
    bad_values = []
    for inp in schema.inputs:
        if isinstance(inp, io.Float.Input):
            bad_values += [(inp.id, NAN, "NaN is not a number"), (inp.id, inp.max + 1, "is above its maximum")]
        elif isinstance(inp, io.Int.Input):
            bad_values += [(inp.id, inp.min - 1, "is below its minimum"), (inp.id, 2.5, "is not a whole number")]
        elif isinstance(inp, io.Combo.Input):
            bad_values.append((inp.id, "float64", "is not "))
    for name, value, words in bad_values:
        with pytest.raises(SparseContextInputError) as info:
            node.execute(**{**args, name: wrap(value)})
        assert str(info.value).startswith(f"{schema.display_name}: {name}: "), str(info.value)
        assert words in str(info.value), str(info.value)
    assert progress_calls == []  # refused before any work (training reports its steps here)


def test_keep_ratio_nan_names_keep_ratio_not_the_budget_argument():
    model = sc_testpack.build_model_patcher(F, 1)
    with pytest.raises(SparseContextInputError, match=r"^Apply Sparse Context: keep_ratio: NaN is not a number"):
        SparseContextApply.execute(model, NAN, "grid", 0, 64, 0.0, 1.0, 0, True)


def test_a_nan_mask_is_reported_as_nan_not_as_empty():
    with pytest.raises(SparseContextInputError, match=r"^Sparse Mask Selector: mask: contains NaN or infinite"):
        SparseContextMaskSelector.execute(mask=torch.full((1, 64, 64), NAN), inside=1.0, outside=0.0, dilate_tokens=1, feather_tokens=2)


def test_lora_files_with_nan_weights_or_a_bad_keep_ratio_are_refused_naming_file_and_key(loras_folder):
    model = sc_testpack.build_model_patcher(F, 1)
    expected = lora_files(loras_folder, model)
    messages = {}
    for name, blame in expected.items():
        if blame is None:
            continue
        with pytest.raises(SparseContextInputError) as info:
            SparseContextLoraLoader.execute(model, name, 1.0)
        messages[name] = str(info.value)
        assert messages[name].startswith(f"Load Sparse Context LoRA: {blame}: "), messages[name]
    first_bad = sorted(k for k in tiny_lora(model) if k.endswith(".lora_down.weight"))[0]
    assert f"nan_weights.safetensors: tensor {first_bad!r} contains NaN" in messages["nan_weights.safetensors"]
    assert "keep_5.safetensors: metadata sparse_context.recommended_keep_ratio is 5.0" in messages["keep_5.safetensors"]
    assert "recommended_keep_ratio is nan" in messages["keep_nan.safetensors"]
    # core reads .sft as safetensors, and so does the loader; its metadata's keep ratio comes out
    patched, keep, text = SparseContextLoraLoader.execute(model, "good.sft", 1.0).args
    assert keep == 0.5 and patched is not model and "3 layers matched" in text


# -- training and example files: everything checked before the expensive part ------------------------------------
def _train_args(**over) -> dict:
    latent = sc_testpack.make_latent(F, 7, 32, 32)
    cond = sc_testpack.make_conditioning(F, 3, tokens=4, references=[latent])
    args = dict(model=sc_testpack.build_model_patcher(F, 1), latents={"samples": latent}, conditioning=cond,
                steps=2, learning_rate=1e-3, rank=2, alpha=2.0, targets="attention", keep_min=0.1, keep_max=1.0,
                dense_share=0.1, recommended_keep_ratio=0.25, seed=0, save_dtype="bf16",
                filename_prefix="sc_test/lora")
    args.update(over)
    return {k: [v] for k, v in args.items()}  # an input-list node: every input arrives as a list


@pytest.mark.parametrize(("over", "message"), [
    ({"save_dtype": "float64"}, r"save_dtype: 'float64' is not one of 'bf16', 'fp16', 'fp32'"),
    ({"filename_prefix": "../../escape"}, r"filename_prefix: '../../escape' would save the LoRA outside the output"),
    ({"filename_prefix": ""}, r"filename_prefix: is empty"),
    ({"keep_min": 0.9, "keep_max": 0.2}, r"keep_min: 0.9 is above keep_max 0.2"),
    ({"latents": {"samples": (klein := sc_testpack.make_latent("flux2_klein", 7, 32, 32))},
      "conditioning": sc_testpack.make_conditioning(F, 3, tokens=4, references=[klein])},
     r"latents: example 1 has 128 latent channels, but the model takes 16"),
], ids=["save_dtype", "escaping-prefix", "empty-prefix", "keep-order", "latent-channels"])
def test_training_refuses_its_configuration_before_the_first_step(over, message, output_folder, progress_calls):
    with pytest.raises(SparseContextInputError, match=rf"^Train Sparse Context LoRA: {message}"):
        SparseContextTrainLora.execute(**_train_args(**over))
    assert progress_calls == [], "a training step ran before the error"
    assert not any(output_folder.rglob("*.safetensors"))


def test_training_example_with_the_target_also_as_reference_is_saved(output_folder):
    from sparse_context.training import load_example_folder

    latent = sc_testpack.make_latent(F, 7, 32, 32)
    cond = sc_testpack.make_conditioning(F, 3, tokens=4, references=[latent])  # the same tensor twice
    (paths,) = SparseContextSaveTrainingExample.execute({"samples": latent}, cond, "shared/ex", "").args
    [example] = load_example_folder(output_folder / "shared")
    assert paths.endswith("ex_00001_.safetensors")
    assert torch.equal(example.target, latent) and torch.equal(example.references[0], latent)


def test_only_output_paths_have_a_queue_time_check_and_it_takes_only_that_input():
    """Core runs its own min/max/combo checks for every input a ``validate_inputs`` does not take, and repeats
    the override's message once per input it takes (see nodes/common.py)."""
    from comfy_api.internal import first_real_override

    assert first_real_override(SparseNode, "validate_inputs") is None
    for node in NODES:
        override = first_real_override(node, "validate_inputs")
        if node in (SparseContextTrainLora, SparseContextSaveTrainingExample):
            spec = inspect.getfullargspec(override)
            assert spec.args == ["cls", "filename_prefix"] and spec.varkw is None, spec
        else:
            assert override is None, f"{node.__name__} overrides validate_inputs: core then skips its own checks"


# -- through the real server -----------------------------------------------------------------------------------------
def _selector_graph(**saliency) -> dict:
    return {
        "lat": tiny_latent(F, 2),
        "img": {"class_type": "SCTest_LatentToImage", "inputs": {"samples": ["lat", 0]}},
        "sal": {"class_type": "SparseContextSaliencySelector", "inputs": {"image": ["img", 0], "blur_tokens": 1.0,
                                                                          "weight": 1.0, **saliency}},
        "pv": {"class_type": "SparseContextPreview", "inputs": {"image": ["img", 0], "selection": ["sal", 0],
                                                                "bucket": 1}},
    }


def _lora_graph(lora_name: str, strength) -> dict:
    return {
        "model": {"class_type": "SCTest_TinyModel", "inputs": {"family": F, "seed": 1}},
        "lora": {"class_type": "SparseContextLoraLoader", "inputs": {"model": ["model", 0], "lora_name": lora_name,
                                                                     "strength": strength}},
        "apply": {"class_type": "SparseContextApply", "inputs": {
            "model": ["lora", 0], "keep_ratio": ["lora", 1], "rule": "grid", "total_tokens": 0, "bucket": 1,
            "start_percent": 0.0, "end_percent": 1.0, "seed": 0, "enabled": True}},
        "cond": {"class_type": "SCTest_Conditioning", "inputs": {"family": F, "seed": 3, "tokens": 8}},
        "ref": tiny_latent(F, 4),
        "pos": {"class_type": "SparseContextReferenceLatent", "inputs": {"conditioning": ["cond", 0],
                                                                         "latent": ["ref", 0]}},
        "noise": tiny_latent(F, 0, empty=True),
        "ks": ksampler(["apply", 0], ["pos", 0], ["cond", 0], ["noise", 0], steps=1),
        "chk": {"class_type": "SCTest_CheckFinite", "inputs": {"latent": ["ks", 0]}},
    }


def _execution_error(server, graph: dict) -> dict:
    prompt_id, refusal = server.queue(graph)
    assert refusal is None, refusal
    entry = server.outcome(prompt_id)
    errors = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1, entry["status"]
    return errors[0]


@pytest.mark.server
def test_core_checks_widget_values_and_reports_each_bad_input_once(server):
    graph = _selector_graph(blur_tokens=9.0, weight="abc")
    graph["pv"]["inputs"]["bucket"] = 0
    graph["bud"] = {"class_type": "SparseContextBudget", "inputs": {
        "mode": "sometimes", "keep_ratio": float("inf"), "token_count": 16, "mass": 0.8, "min_ratio": 0.05,
        "max_ratio": 0.5, "coverage": -1.0}}
    graph["sal"]["inputs"]["budget"] = ["bud", 0]
    _, refusal = server.queue(graph)
    errors = {node: sorted((e["extra_info"]["input_name"], e["type"]) for e in v["errors"])
              for node, v in refusal["node_errors"].items()}
    combo = [("mode", "value_not_in_list")] if core_checks_v3_combos() else []  # 0.3.75 never checks V3 combos
    assert errors == {
        "sal": [("blur_tokens", "value_bigger_than_max"), ("weight", "invalid_input_type")],
        "pv": [("bucket", "value_smaller_than_min")],
        "bud": sorted([("keep_ratio", "value_bigger_than_max"), *combo]),
    }, refusal
    assert server.proc.poll() is None


@pytest.mark.server
@pytest.mark.parametrize("nan", [float("nan"), "nan"], ids=["json-NaN-literal", "string"])
def test_nan_from_the_api_stops_the_node_naming_the_input(server, nan):
    err = _execution_error(server, _selector_graph(blur_tokens=nan))
    assert err["node_id"] == "sal", err
    assert err["exception_message"].strip() == "Sparse Saliency Selector: blur_tokens: NaN is not a number"


@pytest.mark.server
def test_lora_strength_nan_and_bad_lora_files_stop_at_the_loader(server):
    folder = server.tmp / "output" / "loras" / "sc_bad_input"
    expected = lora_files(folder, sc_testpack.build_model_patcher(F, 1))
    err = _execution_error(server, _lora_graph("sc_bad_input/good.safetensors", float("nan")))
    assert (err["node_id"], err["exception_message"].strip()) == (
        "lora", "Load Sparse Context LoRA: strength: NaN is not a number")
    for name in ("nan_weights.safetensors", "keep_5.safetensors"):
        assert expected[name] == "lora_name"
        err = _execution_error(server, _lora_graph(f"sc_bad_input/{name}", 1.0))
        assert err["node_id"] == "lora", err  # not Apply Sparse Context blaming "ratio" later
        assert err["exception_message"].startswith(f"Load Sparse Context LoRA: lora_name: {name}: "), err
    entry = server.run(_lora_graph("sc_bad_input/good.sft", 1.0))
    assert entry["outputs"]["chk"]["finite"] == [True]


@pytest.mark.server
def test_training_nodes_refuse_an_escaping_prefix_at_queue_time_once(server):
    train = {
        "model": {"class_type": "SCTest_TinyModel", "inputs": {"family": F, "seed": 1}},
        "tgt": tiny_latent(F, 7, size=32),
        "cond": {"class_type": "SCTest_Conditioning", "inputs": {"family": F, "seed": 3, "tokens": 4}},
        "pos": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["cond", 0], "latent": ["tgt", 0]}},
        "train": {"class_type": "SparseContextTrainLora", "inputs": {
            "model": ["model", 0], "latents": ["tgt", 0], "conditioning": ["pos", 0], "steps": 1,
            "learning_rate": 1e-4, "rank": 2, "alpha": 2.0, "targets": "attention", "keep_min": 0.1, "keep_max": 1.0,
            "dense_share": 0.1, "recommended_keep_ratio": 0.25, "seed": 0, "save_dtype": "bf16",
            "filename_prefix": "../../escape"}},
        "save": {"class_type": "SparseContextSaveTrainingExample", "inputs": {
            "latent": ["tgt", 0], "conditioning": ["pos", 0], "filename_prefix": "../x", "prompt": ""}},
    }
    _, refusal = server.queue(train)
    got = {node: [(e["extra_info"]["input_name"], e["details"]) for e in v["errors"]]
           for node, v in refusal["node_errors"].items()}
    assert got == {
        "train": [("filename_prefix", "filename_prefix - Train Sparse Context LoRA: filename_prefix: '../../escape' "
                                      "would save the LoRA outside the output folder; use a path inside it (no '..')")],
        "save": [("filename_prefix", "filename_prefix - Save Sparse Context Training Example: filename_prefix: '../x' "
                                     "would save the training examples outside the output folder; use a path inside "
                                     "it (no '..')")],
    }, refusal
    # an unknown dtype: core refuses it at queue time on 0.10+, the node before its first step on 0.3.75
    train["train"]["inputs"].update(filename_prefix="sc_bad_input/lora", save_dtype="float64")
    del train["save"]
    if core_checks_v3_combos():
        _, refusal = server.queue(train)
        assert [e["extra_info"]["input_name"] for e in refusal["node_errors"]["train"]["errors"]] == ["save_dtype"]
    else:
        err = _execution_error(server, train)
        assert err["exception_message"].startswith("Train Sparse Context LoRA: save_dtype: 'float64' is not one of")
    assert not list((server.tmp / "output" / "loras" / "sc_bad_input").glob("lora*"))


@pytest.mark.server
def test_a_small_grey_png_through_load_image_gets_a_selection(server):
    from PIL import Image

    Image.new("RGB", (64, 48), (128, 128, 128)).save(server.tmp / "input" / "grey_64x48.png")
    graph = _selector_graph()
    graph["img"] = {"class_type": "LoadImage", "inputs": {"image": "grey_64x48.png"}}
    graph["chk"] = {"class_type": "SCTest_CheckFinite", "inputs": {"image": ["pv", 0]}}
    entry = server.run(graph)
    assert entry["outputs"]["chk"] == {"finite": [True], "shape": [1, 48, 64, 3]}
