"""Every node we share with ComfyUI declares itself as ComfyUI does, field by field.

The reference is ComfyUI 0.3.64's own /object_info (tests/data/comfyui_object_info.json, interface facts only). A
workflow or a client written for ComfyUI relies on these facts: the input names and their order (the UI format
stores widget values by position), types, defaults (filled in for widgets a saved workflow leaves out), ranges
(validation), combo options, outputs (links are by output index), category and display name (where a user finds a
node), and the flags. So all of them must match, with these exceptions, each for a reason:

- tooltips and descriptions: the reference has none (they were stripped from it), and ours are our own words;
- combos that list files of the installation (`FILE_LISTS`): their content depends on the data folder, so only
  their kind (a combo) is compared;
- the rendering of ComfyUI's newer (V3) nodes, which writes a combo as `["COMBO", {"options": [...]}]` and always
  writes the false values `multiselect`, `multiline`, `api_node`, `deprecated`, `experimental`, where its older
  (V1) nodes, and we, write the options list in the type's place and leave a false flag out: clients read both
  alike, so both forms are brought to one before comparing;
- a `display_name` the reference gives as null (V3 nodes that set none; ComfyUI's front end shows a title from its
  own translations): ours may be any title then;
- `python_module`: ours names our module; clients read only its first part (`nodes` means built in);
- `sampler_name`: ours must be ComfyUI's list in ComfyUI's order, where only the names in
  `STILL_MISSING_SAMPLERS` may be absent;
- `EXTENSIONS`: optional inputs we add on purpose (a ComfyUI workflow, which leaves them out, still runs).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from diffusion.sampling.sampler_registry import SAMPLER_NAMES
from nodes import build_registry
from nodes.environment import Environment

REFERENCE_PATH = Path(__file__).parents[1] / "data" / "comfyui_object_info.json"

# Combo inputs whose options are files of the installation (emptied in the reference).
FILE_LISTS = frozenset({
    "ckpt_name", "config_name", "vae_name", "lora_name", "unet_name", "clip_name", "clip_name1", "clip_name2",
    "clip_name3", "clip_name4", "control_net_name", "gligen_name", "hypernetwork_name", "style_model_name",
    "model_name", "image", "latent", "photomaker_model_name", "file",
})

# Sampler names ComfyUI lists that we may not have yet; shrink it as they land (never computed from our list).
# It held the 20 names P9 added; all of them have landed, so none may be missing now.
STILL_MISSING_SAMPLERS: frozenset[str] = frozenset()

# Inputs ComfyUI does not have that we add on purpose: (class, section, input) -> why.
EXTENSIONS = {
    ("SaveAnimatedWEBP", "optional", "loop"): "how many times the animation plays (ComfyUI always loops forever)",
    ("SaveAnimatedPNG", "optional", "loop"): "how many times the animation plays (ComfyUI always loops forever)",
}

# Our classes ComfyUI does not have. Any other name must be ComfyUI's exactly: a misspelt class (ComfyUI's
# `SamplerDPMAdaptative`, say, written as it "should" be) would otherwise escape every comparison here.
OURS_ONLY = frozenset({
    "PromptSchedule",  # prompt travel over a batch of frames
    "TrainLoraFromImages",  # LoRA training from a folder of images
    # the ComfyUI_IPAdapter_plus node pack's interfaces (checked in tests/nodes/test_ip_adapter_nodes.py)
    "IPAdapter", "IPAdapterAdvanced", "IPAdapterEmbeds", "IPAdapterEncoder", "IPAdapterModelLoader",
    "IPAdapterUnifiedLoader", "IPAdapterCombineEmbeds",
    "DeepCache",  # the ComfyUI-deepcache node pack's interface (checked in tests/nodes/test_acceleration.py)
    # the AnimateDiff-Evolved node pack's basic nodes (checked in tests/nodes/test_animatediff_nodes.py)
    "ADE_AnimateDiffLoaderGen1", "ADE_AnimateDiffLoaderWithContext", "ADE_ApplyAnimateDiffModelSimple",
    "ADE_AnimateDiffLoRALoader",
    "ADE_LoadAnimateDiffModel", "ADE_StandardStaticContextOptions", "ADE_StandardUniformContextOptions",
    "ADE_UseEvolvedSampling",
    "LoadVideoFrames",  # a video as frames: rate, range, cap (checked in tests/nodes/test_video_nodes.py)
})

# Keys ComfyUI's /object_info can give a node; we always give all of them.
NODE_KEYS = frozenset({"input", "input_order", "output", "output_is_list", "output_name", "output_tooltips", "name",
                       "display_name", "description", "python_module", "category", "output_node", "deprecated",
                       "experimental", "api_node"})
FLAGS = ("output_node", "deprecated", "experimental", "api_node")
CORE_MODULES = ("nodes", "comfy_extras", "comfy_api_nodes")
SECTIONS = ("required", "optional", "hidden")


def _v1_entry(name: str, display: str, category: str, module: str, required: dict[str, Any],
              outputs: list[str]) -> dict[str, Any]:
    return {"name": name, "display_name": display, "category": category, "python_module": module,
            "input": {"required": required}, "input_order": {"required": list(required)}, "output": outputs,
            "output_is_list": [False] * len(outputs), "output_name": outputs, "output_node": False}


# ComfyUI core classes that the reference run's /object_info lacks, as ComfyUI declares them (its public node
# documentation, and the node entries of its published templates that use them); compared like the rest.
NOT_IN_REFERENCE = {
    "UpscaleModelLoader": _v1_entry("UpscaleModelLoader", "Load Upscale Model", "loaders",
                                    "comfy_extras.nodes_upscale_model", {"model_name": [[]]}, ["UPSCALE_MODEL"]),
    "ImageUpscaleWithModel": _v1_entry("ImageUpscaleWithModel", "Upscale Image (using Model)", "image/upscaling",
                                       "comfy_extras.nodes_upscale_model",
                                       {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}, ["IMAGE"]),
}


def load_reference() -> dict[str, dict[str, Any]]:
    return {**NOT_IN_REFERENCE, **json.loads(REFERENCE_PATH.read_text(encoding="utf-8"))}


def normalise_spec(spec: Any, v3: bool) -> tuple[str, list[Any] | None, dict[str, Any]]:
    """(type, combo options or None, other options without tooltips), one form for V1 and V3 renderings."""
    if not isinstance(spec, list) or not spec:
        return (repr(spec), None, {})
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    options.pop("tooltip", None)
    if v3:
        for key in ("multiselect", "multiline"):
            if options.get(key) is False:
                del options[key]
    if isinstance(spec[0], list):
        return ("COMBO", list(spec[0]), options)
    if spec[0] == "COMBO":
        return ("COMBO", list(options.pop("options", [])), options)
    return (spec[0], None, options)


def is_subsequence(ours: Sequence[Any], theirs: Sequence[Any]) -> bool:
    """True when `ours` is `theirs` with some entries left out, the rest in the same order."""
    remaining = iter(theirs)
    return all(any(item == other for other in remaining) for item in ours)


def sampler_differences(ours: list[Any], theirs: list[Any]) -> list[str]:
    problems = []
    if not is_subsequence(ours, theirs):
        extra = [n for n in ours if n not in theirs]
        problems.append(f"not ComfyUI's names in ComfyUI's order (names ComfyUI lacks: {extra}; ours: {ours})")
    missing = [n for n in theirs if n not in ours and n not in STILL_MISSING_SAMPLERS]
    if missing:
        problems.append(f"missing {missing}, which are not in STILL_MISSING_SAMPLERS")
    return problems


def input_differences(name: str, ours: list[Any], theirs: list[Any], v3: bool) -> list[str]:
    our_type, our_options, our_config = normalise_spec(ours, v3=False)
    ref_type, ref_options, ref_config = normalise_spec(theirs, v3)
    problems = []
    if our_type != ref_type:
        problems.append(f"type {our_type} != {ref_type}")
    elif our_options is not None and name not in FILE_LISTS:
        if name == "sampler_name":
            problems.extend(sampler_differences(our_options, ref_options or []))
        elif our_options != ref_options:
            problems.append(f"options {our_options} != {ref_options}")
    if our_config != ref_config:
        keys = sorted(set(our_config) | set(ref_config))
        changed = {k: (our_config.get(k, "<absent>"), ref_config.get(k, "<absent>")) for k in keys
                   if our_config.get(k, "<absent>") != ref_config.get(k, "<absent>")}
        problems.append("options differ (ours, ComfyUI's): " + ", ".join(f"{k}={v[0]!r}/{v[1]!r}"
                                                                           for k, v in changed.items()))
    return problems


def node_differences(node: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Every way our /object_info entry for `node` differs from ComfyUI's, one readable line each."""
    v3 = "api_node" in theirs  # only ComfyUI's V3 rendering always writes api_node
    problems = []
    if missing := sorted(NODE_KEYS - set(ours)):
        problems.append(f"keys missing: {missing}")
    for key in ("name", "category", "output", "output_is_list", "output_name"):
        if ours.get(key) != theirs.get(key):
            problems.append(f"{key}: {ours.get(key)!r} != {theirs.get(key)!r}")
    for key in FLAGS:
        if ours.get(key) is not bool(theirs.get(key, False)):
            problems.append(f"{key}: {ours.get(key)!r} != {bool(theirs.get(key, False))!r}")
    title = theirs.get("display_name")
    if (title is not None and ours.get("display_name") != title) or not ours.get("display_name"):
        problems.append(f"display_name: {ours.get('display_name')!r} != {title!r}")
    tooltips = ours.get("output_tooltips")
    if not isinstance(tooltips, list) or len(tooltips) != len(ours.get("output", [])) \
            or not all(isinstance(t, str) for t in tooltips):
        problems.append(f"output_tooltips: {tooltips!r} is not one string per output")
    if not isinstance(ours.get("description"), str):
        problems.append(f"description: {ours.get('description')!r} is not a string")
    if str(ours.get("python_module", "")).split(".")[0] not in CORE_MODULES:
        problems.append(f"python_module: {ours.get('python_module')!r} does not say built in")
    our_order, ref_order = ours.get("input_order", {}), theirs.get("input_order", {})
    for section in SECTIONS:
        ours_names = [n for n in our_order.get(section, []) if (node, section, n) not in EXTENSIONS]
        if ours_names != ref_order.get(section, []):
            problems.append(f"input_order.{section}: {ours_names} != {ref_order.get(section, [])}")
        our_inputs = ours.get("input", {}).get(section, {})
        ref_inputs = theirs.get("input", {}).get(section, {})
        for name in our_inputs:
            if name not in ref_inputs and (node, section, name) not in EXTENSIONS:
                problems.append(f"{section}.{name}: ComfyUI has no such input")
        for name, spec in ref_inputs.items():
            if name not in our_inputs:
                problems.append(f"{section}.{name}: missing ({spec!r})")
            elif section == "hidden":
                if our_inputs[name] != spec:
                    problems.append(f"hidden.{name}: {our_inputs[name]!r} != {spec!r}")
            else:
                problems.extend(f"{section}.{name}: {p}" for p in input_differences(name, our_inputs[name], spec, v3))
    return problems


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    env = Environment(tmp_path_factory.mktemp("data"))
    return build_registry(env, plugins=False).object_info(env), load_reference()


def test_every_shared_node_declares_itself_as_comfyui_does(rendered):
    ours, reference = rendered
    shared = [name for name in ours if name in reference]
    assert len(shared) >= 82, f"only {len(shared)} classes shared with ComfyUI; the reference did not load right?"
    report = []
    for name in shared:
        problems = node_differences(name, ours[name], reference[name])
        if problems:
            report.append(f"{name}:\n" + "\n".join(f"    {p}" for p in problems))
    assert not report, (f"{len(report)} of {len(shared)} classes shared with ComfyUI differ from its /object_info:\n"
                        + "\n".join(report))


def test_every_class_is_comfyuis_or_known_to_be_ours(rendered):
    ours, reference = rendered
    unknown = sorted(set(ours) - set(reference) - OURS_ONLY)
    assert not unknown, (f"classes ComfyUI does not have (a misspelt name? else add them to OURS_ONLY with why): "
                         f"{unknown}")
    assert set(ours) >= OURS_ONLY, sorted(OURS_ONLY - set(ours))


def test_still_missing_samplers_are_comfyui_names():
    """The allowance holds only names ComfyUI lists (a typo would allow nothing and hide nothing). It is shrunk
    by hand as samplers land, not computed from our list; failing here when one lands would block whoever adds
    it on this file."""
    reference = load_reference()["KSampler"]["input"]["required"]["sampler_name"][0]
    assert set(reference) >= STILL_MISSING_SAMPLERS, sorted(STILL_MISSING_SAMPLERS - set(reference))
    assert len(SAMPLER_NAMES) + len(STILL_MISSING_SAMPLERS) >= len(reference)


def test_extensions_name_inputs_we_have(rendered):
    ours, _ = rendered
    for node, section, name in EXTENSIONS:
        assert name in ours[node]["input"].get(section, {}), (node, section, name)


def test_comparison_catches_each_kind_of_difference():
    """The comparison itself: a changed default, range, step, type, order, output, title or flag, a missing
    hidden input, a sampler out of order or missing, each is reported; the V3 combo form is not a difference."""
    reference = load_reference()
    ksampler = reference["KSampler"]
    assert node_differences("KSampler", as_ours(ksampler), ksampler) == []

    def changed(entry: dict[str, Any], edit) -> dict[str, Any]:
        copy = json.loads(json.dumps(as_ours(entry)))
        edit(copy)
        return copy

    edits = {
        "default": lambda e: e["input"]["required"]["steps"][1].update(default=30),
        "max": lambda e: e["input"]["required"]["cfg"][1].update(max=30.0),
        "step": lambda e: e["input"]["required"]["seed"][1].update(step=1),
        "type": lambda e: e["input"]["required"].update(denoise=["INT", {"default": 1, "min": 0, "max": 1}]),
        "input_order": lambda e: e["input_order"]["required"].reverse(),
        "output_name": lambda e: e.update(output_name=["latent"]),
        "display_name": lambda e: e.update(display_name="K Sampler"),
        "deprecated": lambda e: e.update(deprecated=True),
        "sampler order": lambda e: e["input"]["required"]["sampler_name"][0].reverse(),
        "sampler missing": lambda e: e["input"]["required"]["sampler_name"][0].remove("dpmpp_2m"),
        "scheduler": lambda e: e["input"]["required"]["scheduler"][0].pop(),
        "missing input": lambda e: e["input"]["required"].pop("denoise"),
        "extra input": lambda e: e["input"]["required"].update(eta=["FLOAT", {"default": 0.0}]),
    }
    for what, edit in edits.items():
        assert node_differences("KSampler", changed(ksampler, edit), ksampler), f"a changed {what} went unnoticed"
    size = reference["GetImageSize"]
    no_hidden = changed(size, lambda e: (e["input"].pop("hidden"), e["input_order"].pop("hidden")))
    assert any("unique_id" in p for p in node_differences("GetImageSize", no_hidden, size))
    blend = reference["ImageBlend"]  # a V3 node: ["COMBO", {"options": [...], "multiselect": false}]
    assert blend["input"]["required"]["blend_mode"][0] == "COMBO"
    v1_form = changed(blend, lambda e: e["input"]["required"].update(
        blend_mode=[blend["input"]["required"]["blend_mode"][1]["options"], {}]))
    assert node_differences("ImageBlend", v1_form, blend) == []
    wrong_options = changed(blend, lambda e: e["input"]["required"].update(blend_mode=[["normal"], {}]))
    assert node_differences("ImageBlend", wrong_options, blend)


def as_ours(entry: dict[str, Any]) -> dict[str, Any]:
    """A reference entry rendered the way we render nodes: every key present, flags as booleans."""
    copy = json.loads(json.dumps(entry))
    copy.setdefault("description", "")
    copy.setdefault("output_tooltips", [""] * len(copy["output"]))
    copy["python_module"] = "nodes"
    copy["display_name"] = copy.get("display_name") or copy["name"]
    for flag in FLAGS:
        copy[flag] = bool(copy.get(flag, False))
    return copy


def test_is_subsequence():
    assert is_subsequence(["a", "c"], ["a", "b", "c"])
    assert is_subsequence([], ["a"])
    assert not is_subsequence(["c", "a"], ["a", "b", "c"])
    assert not is_subsequence(["a", "x"], ["a", "b", "c"])


def test_every_declared_input_reaches_execute(tmp_path):
    """What /object_info declares, the executor passes by name (hidden ones such as GetImageSize's unique_id
    too): each must be a parameter of `execute`, or the node fails with a TypeError when it runs."""
    registry = build_registry(Environment(tmp_path), plugins=False)
    problems = []
    for name, cls in registry.items():
        parameters = inspect.signature(cls.execute).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = [n for n in [i.name for i in cls.inputs] + list(cls.hidden) if n not in parameters]
        if unknown:
            problems.append(f"{name}.execute takes no {unknown}")
    assert not problems, "\n".join(problems)
