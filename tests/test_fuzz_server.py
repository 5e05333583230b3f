"""Property test through the REAL server: random valid and invalid values for every node's inputs give either an
output (finite) or ONE clear error that starts with the node's display name; never a Python exception name.

Each example builds a small real graph around one pack node (the target, id ``T``), draws its widget values
(mostly valid, some out of range, NaN, inf, strings that are not numbers, unknown combo options, escaping
output paths) and some structure (picture sizes from 1 px to thin strips, empty/NaN masks, bad LoRA files,
missing references), queues it with ``POST /prompt`` (floats travel as JSON allows: ``NaN``/``Infinity``
literals) and checks the outcome against an oracle:

* values core refuses (its own conversion, min/max and combo checks; the pack's ``filename_prefix`` check)
  must be refused at queue time, each bad input named exactly once, nothing else refused;
* a NaN in a FLOAT widget (core lets it through), or on 0.3.75 an unknown combo value (0.3.75 does not check
  V3 combos), must stop the target when it executes, naming that input;
* a relation between inputs or a structural problem that cannot work must give one execution error from a
  pack node: ``"<display name>: <input>[/<input>]: ..."`` (inputs of that node), one line;
* everything else must run, and every image/latent it produces must be finite.

Bounded for CI: ``EXAMPLES`` keeps the whole module well under 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import re
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sc_harness.host import core_checks_v3_combos
from sc_harness.prompts import ksampler, node, tiny_latent

pytestmark = pytest.mark.server

F = "flux1_kontext"
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback")
#: examples per target node, deterministic (``derandomize``): the module takes about a minute on 2 CPU cores, well
#: under CI's 3-minute budget. ``SPARSECONTEXT_FUZZ=N`` runs N times as many, freshly random, for a longer search.
EXAMPLES = {
    "SparseContextApply": 40, "SparseContextReferenceLatent": 20, "SparseContextBindSelections": 30,
    "SparseContextEdgeSelector": 50, "SparseContextSaliencySelector": 60, "SparseContextMaskSelector": 60,
    "SparseContextRandomSelector": 40, "SparseContextGridSelector": 40, "SparseContextCombineSelections": 50,
    "SparseContextBudget": 40, "SparseContextPreview": 30, "SparseContextLoraLoader": 50,
    "SparseContextTrainLora": 16, "SparseContextSaveTrainingExample": 40, "SparseContextAttentionSelector": 30,
    "SparseContextCalibrate": 20,
}
SCALE = float(os.environ.get("SPARSECONTEXT_FUZZ", "0") or 0)
#: valid draws narrower than the schema where the full range only costs time (training steps, LoRA rank) or would
#: mostly give keep_min > keep_max, so that training rarely runs (that case has its own test in test_bad_input.py)
CHEAP = {("SparseContextTrainLora", "steps"): (1, 2), ("SparseContextTrainLora", "rank"): (1, 8),
         ("SparseContextTrainLora", "keep_min"): (0.01, 0.5), ("SparseContextTrainLora", "keep_max"): (0.5, 1.0),
         ("SparseContextCalibrate", "steps"): (1, 2)}
#: valid combo draws narrowed the same way (every sampler runs; these are the quick ones)
CHEAP_CHOICES = {("SparseContextCalibrate", "sampler_name"): ["euler", "euler_ancestral", "heun", "dpmpp_2m"],
                 ("SparseContextCalibrate", "scheduler"): ["simple", "normal", "karras", "beta"]}
KEEP_LISTS = ["0.1, 0.25, 0.5, 0.75", "0.5", "0.3;0.6", " 0.2 ,0.9 "]
BAD_KEEP_LISTS = ["", "abc", "0.5, 1.5", "0, 0.5", "nan", "1", "0.5,,x"]
#: picture sizes: anything from 1 px, plus the thin strips of the fuzz run that found the saliency crash
STRIPS = [(1024, 16), (16, 1024), (1, 512), (512, 1), (1, 1), (16, 16), (48, 48), (64, 48)]
GOOD_PREFIXES = ["sc_fuzz/run", "sc_fuzz/deep/er/name", "x", "sc_fuzz/%year%-run"]
BAD_PREFIXES = ["../escape", "../../escape/x", "/tmp/sc_fuzz_abs", "sc_fuzz/../../x", "", "   ", "bad\x00name",
                "sc_fuzz/" + "n" * 300]


# -- the oracle: what core itself refuses at queue time (execution.py's validate_inputs, 0.3.75 .. 0.30.0) --------
def widget_specs(info: dict) -> dict[str, tuple[str, dict]]:
    """Widget inputs of a node from /object_info: name -> (kind, options); kind INT/FLOAT/STRING/BOOLEAN/COMBO."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            if kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                specs[name] = (kind, opts)
    return specs


def core_converts(kind: str, value):
    """The value core hands the node after its own conversion; raises where core refuses it."""
    return {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind, lambda v: v)(value)


def core_refuses(kind: str, opts: dict, value, combos: bool) -> bool:
    try:
        v = core_converts(kind, value)
    except (TypeError, ValueError, OverflowError):
        return True
    if kind in ("INT", "FLOAT") and (("min" in opts and v < opts["min"]) or ("max" in opts and v > opts["max"])):
        return True
    return combos and kind == "COMBO" and v not in opts["options"]


def pack_refuses_at_execution(kind: str, opts: dict, value, combos: bool) -> bool:
    """What core lets through and ``SparseNode.check_inputs`` must stop: NaN, and unknown combos on 0.3.75."""
    try:
        v = core_converts(kind, value)
    except (TypeError, ValueError, OverflowError):
        return False
    return (kind == "FLOAT" and math.isnan(v)) or (not combos and kind == "COMBO" and v not in opts["options"])


# -- value strategies -------------------------------------------------------------------------------------------
def value_strategies(node: str, name: str, kind: str, opts: dict):
    """(valid, invalid) values of one widget input, as an API client could send them."""
    if kind in ("INT", "FLOAT"):
        low, high = CHEAP.get((node, name), (opts.get("min", -1000), opts.get("max", 1000)))  # valid draws
        top, bottom = opts.get("max", 1000), opts.get("min", -1000)  # the schema's bounds
        if kind == "INT":
            valid = st.one_of(st.integers(low, min(high, low + 64)), st.integers(low, high), st.sampled_from([low, high]))
            invalid = st.one_of(st.integers(top + 1, top + 10**6), st.integers(bottom - 10**6, bottom - 1),
                                st.sampled_from([float("nan"), float("inf"), "abc", None, "1.5", "nan"]))
        else:
            valid = st.one_of(st.floats(low, high, allow_nan=False), st.sampled_from([low, high, (low + high) / 2]))
            invalid = st.one_of(st.floats(top, top + 1e6, exclude_min=True),
                                st.floats(bottom - 1e6, bottom, exclude_max=True),
                                st.sampled_from([float("nan"), "nan", "NaN", float("inf"), float("-inf"), "inf", "abc",
                                                 None]))
        return valid, invalid
    if kind == "COMBO":
        valid = st.sampled_from(CHEAP_CHOICES.get((node, name), opts["options"]))
        return valid, st.text(max_size=8).filter(lambda t: t not in opts["options"])
    if kind == "BOOLEAN":
        return st.booleans(), st.sampled_from([0, 1, "yes", ""])  # core's bool(): any value is a boolean
    if name == "filename_prefix":
        return st.sampled_from(GOOD_PREFIXES), st.sampled_from(BAD_PREFIXES)
    if name == "keep_ratios":
        return st.sampled_from(KEEP_LISTS), st.one_of(st.sampled_from(BAD_KEEP_LISTS), st.text(max_size=12))
    return st.text(max_size=40), st.text(max_size=40)


@st.composite
def widget_values(draw, node: str, specs: dict) -> dict:
    """Half the examples all valid; the others with one bad input, or each input bad with probability 1/3."""
    how = draw(st.sampled_from(["valid", "valid", "one", "many"]))
    bad_one = draw(st.sampled_from(sorted(specs))) if how == "one" and specs else None
    values = {}
    for name, (kind, opts) in specs.items():
        valid, invalid = value_strategies(node, name, kind, opts)
        bad = name == bad_one or (how == "many" and draw(st.integers(0, 2)) == 0)
        values[name] = draw(invalid if bad else valid)
    return values


# -- graph pieces -------------------------------------------------------------------------------------------------
def picture(g: dict, draw) -> list:
    """A real picture (a seeded latent projected to RGB, resized by core's ImageScale) of a drawn size."""
    w, h = draw(st.one_of(st.tuples(st.integers(1, 96), st.integers(1, 96)), st.sampled_from(STRIPS)))
    g["lat"] = tiny_latent(F, 2)
    g["img0"] = node("SCTest_LatentToImage", samples=["lat", 0])
    g["img"] = node("ImageScale", image=["img0", 0], upscale_method="bilinear", width=w, height=h, crop="disabled")
    return ["img", 0]


def sampling(g: dict, model: list, positive: list | None = None) -> None:
    """model -> KSampler (one step, one 64 px reference) -> image -> finiteness check."""
    g.setdefault("cond", node("SCTest_Conditioning", family=F, seed=3, tokens=8))
    g.setdefault("ref", tiny_latent(F, 4))
    if positive is None:
        g["pos"] = node("SparseContextReferenceLatent", conditioning=["cond", 0], latent=["ref", 0])
        positive = ["pos", 0]
    g["noise"] = tiny_latent(F, 0, empty=True)
    g["ks"] = ksampler(model, positive, ["cond", 0], ["noise", 0], steps=1)
    g["chk"] = node("SCTest_CheckFinite", latent=["ks", 0])


def preview(g: dict, image: list, selection: list) -> None:
    g["pv"] = node("SparseContextPreview", image=image, selection=selection, bucket=1)
    g["chk"] = node("SCTest_CheckFinite", image=["pv", 0])


def default_apply(model: list, **over) -> dict:
    inputs = dict(model=model, keep_ratio=0.5, rule="grid", total_tokens=0, bucket=1, start_percent=0.0,
                  end_percent=1.0, seed=0, enabled=True)
    return node("SparseContextApply", **{**inputs, **over})


class Plan:
    """A drawn graph plus what must happen: ``must`` = inputs one of which an error must name (None: none
    must fail), ``may`` = inputs an error may name (structure that can fail or not)."""

    def __init__(self, graph: dict, values: dict, must: set[str] | None = None, may: set[str] = frozenset()):
        self.graph, self.values, self.must, self.may = graph, values, must, set(may)


def build(kind: str, draw, values: dict, lora_names: dict) -> Plan:
    g: dict = {}
    v = dict(values)
    must: set[str] = set()
    may: set[str] = set()

    def ok(name: str, kind_: str = "FLOAT") -> bool:  # a drawn number that reaches execute as itself
        try:
            x = core_converts(kind_, v[name])
            return not math.isnan(x)
        except (TypeError, ValueError, OverflowError):
            return False

    if kind in ("SparseContextEdgeSelector", "SparseContextSaliencySelector", "SparseContextRandomSelector",
                "SparseContextGridSelector"):
        image = picture(g, draw)
        g["T"] = node(kind, image=image, **v)
        if draw(st.booleans()):
            g["bud"] = node("SparseContextBudget", mode="ratio", keep_ratio=0.25, token_count=64, mass=0.8,
                            min_ratio=0.05, max_ratio=0.5, coverage=-1.0)
            g["T"]["inputs"]["budget"] = ["bud", 0]
        preview(g, image, ["T", 0])
        if kind == "SparseContextEdgeSelector" and ok("low_threshold") and ok("high_threshold") \
                and float(v["low_threshold"]) > float(v["high_threshold"]):
            must.add("low_threshold")
    elif kind == "SparseContextMaskSelector":
        image = picture(g, draw)
        source = draw(st.sampled_from(["solid", "solid", "threshold", "empty", "nan"]))
        w, h = g["img"]["inputs"]["width"], g["img"]["inputs"]["height"]
        if source == "threshold":
            g["m0"] = node("ImageToMask", image=image, channel="red")
            g["m"] = node("ThresholdMask", mask=["m0", 0], value=draw(st.floats(0.0, 1.0)))
            may.add("mask")  # empty or not, depending on the picture
        else:
            value = {"solid": draw(st.sampled_from([1.0, 0.5, 0.01])), "empty": 0.0, "nan": float("nan")}[source]
            g["m"] = node("SolidMask", value=value, width=w, height=h)
            if source != "solid":
                must.add("mask")
        g["T"] = node(kind, mask=["m", 0], **v)
        preview(g, image, ["T", 0])
        if ok("inside") and ok("outside") and float(v["inside"]) == float(v["outside"]):
            must.update({"inside", "outside"})
    elif kind == "SparseContextCombineSelections":
        image = picture(g, draw)
        kinds = ["SparseContextGridSelector", "SparseContextRandomSelector", "SparseContextEdgeSelector"]
        connected = ["a", "b"] + [s for s in "cd" if draw(st.booleans())]
        for s in connected:
            sel = draw(st.sampled_from(kinds))
            extra = {"seed": 1} if sel.endswith("RandomSelector") else \
                {"low_threshold": 0.1, "high_threshold": 0.2, "spread": 1} if sel.endswith("EdgeSelector") else {}
            g[f"s{s}"] = node(sel, image=image, weight=1.0, **extra)
        g["T"] = node(kind, **{f"selection_{s}": [f"s{s}", 0] for s in connected}, **v)
        preview(g, image, ["T", 0])
        weights = [f"weight_{s}" for s in connected]
        if all(ok(w) for w in weights) and not any(float(v[w]) > 0 for w in weights):
            must.update(weights)
    elif kind == "SparseContextBudget":
        g["T"] = node(kind, **v)
        if draw(st.booleans()):
            image = picture(g, draw)
            g["sel"] = node("SparseContextGridSelector", image=image, budget=["T", 0], weight=1.0)
            preview(g, image, ["sel", 0])
        else:
            g["model"] = node("SCTest_TinyModel", family=F, seed=1)
            g["apply"] = default_apply(["model", 0], budget=["T", 0])
            sampling(g, ["apply", 0])
        if ok("min_ratio") and ok("max_ratio") and float(v["min_ratio"]) > float(v["max_ratio"]):
            must.add("min_ratio")
    elif kind == "SparseContextPreview":
        image = picture(g, draw)
        g["sel"] = node(draw(st.sampled_from(["SparseContextGridSelector", "SparseContextSaliencySelector"])),
                        image=image, weight=1.0)
        if g["sel"]["class_type"].endswith("SaliencySelector"):
            g["sel"]["inputs"]["blur_tokens"] = 1.0
        g["T"] = node(kind, image=image, selection=["sel", 0], **v)
        g["chk"] = node("SCTest_CheckFinite", image=["T", 0])
    elif kind == "SparseContextApply":
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["T"] = node(kind, model=["model", 0], **v)
        if draw(st.booleans()):
            g["bud"] = node("SparseContextBudget", mode=draw(st.sampled_from(["ratio", "count", "adaptive"])),
                            keep_ratio=0.25, token_count=8, mass=0.8, min_ratio=0.05, max_ratio=0.5, coverage=-1.0)
            g["T"]["inputs"]["budget"] = ["bud", 0]
        sampling(g, ["T", 0])
        if ok("start_percent") and ok("end_percent") and float(v["start_percent"]) > float(v["end_percent"]):
            must.add("start_percent")
    elif kind == "SparseContextAttentionSelector":
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["apply"] = default_apply(["model", 0], cache=draw(st.sampled_from(["off", "reference_only", "first_step"])))
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=8)
        g["ref"] = tiny_latent(F, 4)
        if draw(st.booleans()):
            g["sel"] = node("SparseContextGridSelector", image=picture(g, draw), weight=1.0)
            v["selection"] = ["sel", 0]
        g["T"] = node(kind, **v)
        g["pos"] = node("SparseContextReferenceLatent", conditioning=["cond", 0], latent=["ref", 0], selection=["T", 0])
        sampling(g, ["apply", 0], positive=["pos", 0])
    elif kind == "SparseContextReferenceLatent":
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["apply"] = default_apply(["model", 0])
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=8)
        inputs = {"conditioning": ["cond", 0]}
        with_latent, with_selection = draw(st.booleans()), draw(st.booleans())
        if with_latent:
            g["ref"] = node("SCTest_Latent", family=F, seed=4, width=draw(st.sampled_from([16, 48, 64, 128])),
                            height=draw(st.sampled_from([16, 64, 96])), batch_size=1, empty=False)
            inputs["latent"] = ["ref", 0]
        if with_selection:
            image = picture(g, draw)
            g["sel"] = node("SparseContextGridSelector", image=image, weight=1.0)
            inputs["selection"] = ["sel", 0]
            if not with_latent:
                must.add("selection")
        g["T"] = node(kind, **inputs)
        sampling(g, ["apply", 0], positive=["T", 0])
    elif kind == "SparseContextBindSelections":
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["apply"] = default_apply(["model", 0])
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=8)
        refs = draw(st.integers(0, 3))
        last = ["cond", 0]
        for i in range(refs):
            g[f"r{i}"] = tiny_latent(F, 10 + i)
            g[f"rl{i}"] = node("ReferenceLatent", conditioning=last, latent=[f"r{i}", 0])
            last = [f"rl{i}", 0]
        slots = sorted(draw(st.sets(st.integers(1, 4), max_size=4)))
        image = picture(g, draw) if slots else None
        for k in slots:
            g[f"s{k}"] = node("SparseContextGridSelector", image=image, weight=1.0)
        g["T"] = node(kind, conditioning=last, **{f"selection_{k}": [f"s{k}", 0] for k in slots})
        sampling(g, ["apply", 0], positive=["T", 0])
        if slots and max(slots) > refs:
            must.add(f"selection_{max(slots)}")
    elif kind == "SparseContextLoraLoader":
        name = draw(st.sampled_from(sorted(lora_names)))
        v["lora_name"] = name if draw(st.integers(0, 9)) else v["lora_name"]  # mostly a real file
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["T"] = node(kind, model=["model", 0], **v)
        g["apply"] = default_apply(["T", 0], keep_ratio=["T", 1])
        sampling(g, ["apply", 0])
        if lora_names.get(v["lora_name"]):
            must.add("lora_name")
        elif v["lora_name"] not in lora_names:  # another test's file in the loras folder (or not a file at all)
            may.add("lora_name")
    elif kind == "SparseContextTrainLora":
        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["tgt"] = tiny_latent(F, 7, size=32)
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=4)
        g["pos"] = node("ReferenceLatent", conditioning=["cond", 0], latent=["tgt", 0])
        g["T"] = node(kind, model=["model", 0], latents=["tgt", 0], conditioning=["pos", 0], **v)
        g["chk"] = node("SCTest_CheckFinite", image=["T", 3])
        if ok("keep_min") and ok("keep_max") and float(v["keep_min"]) > float(v["keep_max"]):
            must.add("keep_min")
        may.update({"learning_rate", "save_dtype"})  # a large learning rate may diverge: refused, nothing saved
    elif kind == "SparseContextSaveTrainingExample":
        g["tgt"] = node("SCTest_Latent", family=F, seed=7, width=32, height=32, batch_size=draw(st.integers(1, 2)),
                        empty=False)
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=4)
        shared = draw(st.booleans())  # the target latent also wired as the reference (the case)
        if not shared:
            g["ref"] = tiny_latent(F, 8, size=32)
        g["pos"] = node("ReferenceLatent", conditioning=["cond", 0], latent=["tgt" if shared else "ref", 0])
        g["T"] = node(kind, latent=["tgt", 0], conditioning=["pos", 0], **v)
    elif kind == "SparseContextCalibrate":
        from sparse_context.nodes.calibration import parse_keeps

        g["model"] = node("SCTest_TinyModel", family=F, seed=1)
        g["cond"] = node("SCTest_Conditioning", family=F, seed=3, tokens=8)
        g["ref"] = tiny_latent(F, 4)
        positive = ["cond", 0]
        if draw(st.integers(0, 3)):
            g["pos"] = node("ReferenceLatent", conditioning=["cond", 0], latent=["ref", 0])
            positive = ["pos", 0]
        else:
            must.add("positive")  # no reference: nothing to calibrate
        g["empty"] = tiny_latent(F, 0, empty=True)
        g["T"] = node(kind, model=["model", 0], positive=positive, latent=["empty", 0], **v)
        g["plot"] = node("SCTest_CheckFinite", image=["T", 1])
        g["apply"] = default_apply(["model", 0], keep_ratio=["T", 0])
        sampling(g, ["apply", 0], positive=positive)
        try:
            parse_keeps(str(v["keep_ratios"]))
        except ValueError:
            must.add("keep_ratios")
    else:
        raise AssertionError(f"no graph for {kind}: add one (every pack node is fuzzed)")
    return Plan(g, v, must or None, may)


# -- checking one outcome -----------------------------------------------------------------------------------------
def assert_user_text(text: str) -> None:
    assert not EXCEPTION_NAME.search(text), f"a Python exception name reaches the user: {text!r}"


def assert_pack_message(message: str, info: dict, allowed: set[str] | None) -> None:
    """``"<display name>: <input>[/<input>]: ..."``, one line, inputs of that node (one of ``allowed``)."""
    display = info["display_name"]
    text = message.strip()
    assert_user_text(text)
    assert "\n" not in text, f"a multi-line message: {text!r}"
    assert text.startswith(f"{display}: "), f"does not start with the node's display name {display!r}: {text!r}"
    head = text[len(display) + 2:].split(": ", 1)[0]
    inputs = {n for section in ("required", "optional") for n in info["input"].get(section, {})}
    parts = set(head.split("/"))
    assert parts <= inputs, f"{text!r} names {head!r}, not an input of {display} ({sorted(inputs)})"
    if allowed is not None:
        assert parts & allowed, f"{text!r} should name one of {sorted(allowed)}"


def check(server, kind: str, plan: Plan, specs: dict, infos: dict) -> str:
    """Queue ``plan`` and check its outcome against the oracle; returns what happened (for the summary)."""
    values = plan.values
    combos = core_checks_v3_combos()
    queue_bad = {n for n, (k, o) in specs.items() if n in values and core_refuses(k, o, values[n], combos)}
    queue_bad |= {n for n in ("filename_prefix",) if n in values and values[n] in BAD_PREFIXES}
    prompt_id, refusal = server.queue(plan.graph)
    if queue_bad:
        assert refusal is not None, f"queued although {sorted(queue_bad)} are invalid: {values}"
        errors = refusal["node_errors"]
        assert set(errors) == {"T"}, f"errors on other nodes: {errors}"
        named = [e["extra_info"]["input_name"] for e in errors["T"]["errors"]]
        assert sorted(named) == sorted(queue_bad), f"each bad input once: got {named}, want {sorted(queue_bad)}"
        for e in errors["T"]["errors"]:
            assert_user_text(f"{e['message']} {e['details']}")
            if e["type"] == "custom_validation_failed":  # the pack's own queue-time check
                name = e["extra_info"]["input_name"]
                assert e["details"].startswith(f"{name} - "), e
                assert_pack_message(e["details"][len(name) + 3:], infos[kind], {name})
        return "refused: " + "+".join(sorted(queue_bad))
    assert refusal is None, f"refused although every value is valid for core: {values}\n{refusal}"
    entry = server.outcome(prompt_id, poll=0.05)
    status = entry["status"]
    errors = [m for k, m in status["messages"] if k == "execution_error"]
    exec_bad = {n for n, (k, o) in specs.items() if n in values and pack_refuses_at_execution(k, o, values[n], combos)}
    if status["status_str"] == "success":
        assert not exec_bad, f"{sorted(exec_bad)} (NaN or an unknown option) ran without an error: {values}"
        assert plan.must is None, f"ran although one of {sorted(plan.must)} is wrong: {values}"
        for out in entry["outputs"].values():
            if "finite" in out:
                assert out["finite"] == [True], f"a NaN/inf output went through silently: {out} for {values}"
        return "ran"
    assert len(errors) == 1, status["messages"]
    err = errors[0]
    assert err["node_type"] in infos, f"{err['node_type']} (not a pack node) failed: {err['exception_message']}"
    if exec_bad:
        assert err["node_id"] == "T", err
        allowed = exec_bad
    elif err["node_id"] == "T":
        allowed = (plan.must or set()) | plan.may
        assert allowed, f"{kind} failed on valid input {values}: {err['exception_message']}"
    else:
        allowed = None
        assert plan.must is not None or plan.may, f"{err['node_type']} failed on a valid graph: {err['exception_message']}"
    assert_pack_message(err["exception_message"], infos[err["node_type"]], allowed)
    return "failed: " + err["exception_message"].split(": ", 2)[1]


# -- the test -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_env(server):
    import sc_testpack
    from sc_harness.loras import lora_files

    folder = server.tmp / "output" / "loras" / "sc_fuzz"
    names = lora_files(folder, sc_testpack.build_model_patcher(F, 1))
    info = server.object_info()
    infos = {k: v for k, v in info.items() if k.startswith("SparseContext")}
    return infos, {f"sc_fuzz/{n}": bad for n, bad in names.items()}


def test_every_pack_node_is_fuzzed(fuzz_env):
    infos, _ = fuzz_env
    assert set(infos) == set(EXAMPLES), "add the new node to EXAMPLES and build()"


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_random_inputs_give_an_output_or_one_clear_error(server, fuzz_env, kind):
    infos, lora_names = fuzz_env
    specs = widget_specs(infos[kind])
    seen: dict[str, int] = {}
    start = time.monotonic()

    @settings(max_examples=round(EXAMPLES[kind] * (SCALE or 1)), deadline=None, derandomize=not SCALE, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        values = data.draw(widget_values(kind, specs), label="values")
        plan = build(kind, data.draw, values, lora_names)
        what = check(server, kind, plan, specs, infos)
        seen[what] = seen.get(what, 0) + 1

    run()
    print(f"\n{kind} ({time.monotonic() - start:.1f}s): " + ", ".join(f"{k} {n}" for k, n in sorted(seen.items())))
    assert server.proc.poll() is None
