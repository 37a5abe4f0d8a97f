"""The canvas' UI → API conversion (web/js/convert.js, run by node) agrees with the server's (graph/ui_format.py)
on every shipped workflow, on ComfyUI's own templates in tests/workflows/comfyui/, and on variants that use each
canvas-only rule (mute, bypass, reroute chains, a primitive feeding several widgets, note, converted widget, dead
link, dict / short / missing widgets_values, control values present or not, subgraphs nested two levels)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from graph.ui_format import ui_to_api
from nodes import build_registry
from nodes.environment import Environment
from tests.graph.subgraph_util import renamed, wrap_in_subgraph

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
TEMPLATES = sorted((ROOT / "tests" / "workflows" / "comfyui").glob("**/*.json"))  # subgraphs/ included
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: the canvas' converter "
                                                     "cannot run outside a browser without it")

RUNNER = """
import { uiToApi } from %s;
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { objectInfo, workflows } = JSON.parse(Buffer.concat(chunks).toString());
const results = workflows.map((w) => { try { return { api: uiToApi(w, objectInfo) }; }
                                       catch (e) { return { error: String(e.message) }; } });
process.stdout.write(JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def registry_and_info(tmp_path_factory):
    env = Environment(tmp_path_factory.mktemp("web-convert") / "data")
    (env.models_dir / "checkpoints").mkdir(parents=True)
    (env.models_dir / "checkpoints" / "first-listed.safetensors").write_bytes(b"")  # listed, never loaded
    registry = build_registry(env, plugins=False)
    return registry, registry.object_info(env), env


def convert_in_node(workflows: list[dict], object_info: dict) -> list[dict]:
    module = json.dumps((ROOT / "web" / "js" / "convert.js").as_uri())
    proc = subprocess.run([NODE, "--input-type=module", "-e", RUNNER % module], capture_output=True, text=True,
                          input=json.dumps({"objectInfo": object_info, "workflows": workflows}), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


def node_of(workflow: dict, node_type: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == node_type)


def add_link(workflow: dict, origin: int, origin_slot: int, target: int, target_slot: int, kind: str) -> int:
    workflow["last_link_id"] += 1
    link_id = workflow["last_link_id"]
    workflow["links"].append([link_id, origin, origin_slot, target, target_slot, kind])
    return link_id


def retarget(workflow: dict, link_id: int, origin: int, origin_slot: int) -> None:
    for link in workflow["links"]:
        if link[0] == link_id:
            link[1], link[2] = origin, origin_slot


def variants() -> dict[str, dict]:
    """Variants of the shipped workflows that exercise every rule the canvas resolves away."""
    out = {}
    muted = load("hires-fix.json")
    node_of(muted, "LatentUpscaleBy")["mode"] = 2
    out["muted upscale"] = muted

    bypassed = load("hires-fix.json")
    node_of(bypassed, "LatentUpscaleBy")["mode"] = 4
    out["bypassed upscale"] = bypassed

    rerouted = load("txt2img.json")
    encode = node_of(rerouted, "CLIPTextEncode")
    clip_link = encode["inputs"][0]["link"]
    rerouted["nodes"].append({"id": 50, "type": "Reroute", "pos": [0, 0], "mode": 0,
                              "inputs": [{"name": "", "type": "*", "link": clip_link}],
                              "outputs": [{"name": "", "type": "CLIP", "links": []}]})
    new_link = add_link(rerouted, 50, 0, encode["id"], 0, "CLIP")
    for link in rerouted["links"]:
        if link[0] == clip_link:
            link[3], link[4] = 50, 0
    encode["inputs"][0]["link"] = new_link
    rerouted["nodes"].append({"id": 51, "type": "Note", "pos": [0, 0], "mode": 0, "widgets_values": ["a note"]})
    out["reroute and note"] = rerouted

    primitive = load("txt2img.json")
    sampler = node_of(primitive, "KSampler")
    primitive["nodes"].append({"id": 60, "type": "PrimitiveNode", "pos": [0, 0], "mode": 0,
                               "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "seed"}}],
                               "widgets_values": [1234, "fixed"]})
    seed_link = add_link(primitive, 60, 0, sampler["id"], 4, "INT")
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": seed_link, "widget": {"name": "seed"}})
    out["primitive seed"] = primitive

    converted = load("txt2img.json")
    node_of(converted, "KSampler")["inputs"].append({"name": "steps", "type": "INT", "link": None,
                                                      "widget": {"name": "steps"}})
    node_of(converted, "VAEDecode")["inputs"][1]["link"] = 999  # a dead link
    out["converted widget, dead link"] = converted

    short = load("txt2img.json")
    node_of(short, "KSampler")["widgets_values"] = [7, 3, 2.5, "euler", "karras", 0.5]  # no control value
    node_of(short, "EmptyLatentImage")["widgets_values"] = {"width": 128, "height": 64, "batch_size": 2}
    out["no control value, dict values"] = short

    blank = load("txt2img.json")
    for node in blank["nodes"]:
        if node["type"] in ("CLIPTextEncode", "KSampler"):
            node.pop("widgets_values", None)  # prompts and sampler combos declare no default (as ComfyUI's)
    out["no values where no default"] = blank
    return out


def test_converters_agree_on_every_shipped_workflow(registry_and_info):
    registry, info, env = registry_and_info
    assert len(SHIPPED) >= 9 and len(TEMPLATES) >= 1
    workflows = [json.loads(p.read_text()) for p in SHIPPED + TEMPLATES]
    results = convert_in_node(workflows, info)
    for path, workflow, result in zip(SHIPPED + TEMPLATES, workflows, results, strict=True):
        expected = ui_to_api(copy.deepcopy(workflow), registry, env)
        assert result == {"api": expected}, path.name


def test_converters_agree_on_canvas_only_rules(registry_and_info):
    registry, info, env = registry_and_info
    cases = variants()
    results = convert_in_node(list(cases.values()), info)
    for (name, workflow), result in zip(cases.items(), results, strict=True):
        assert result == {"api": ui_to_api(copy.deepcopy(workflow), registry, env)}, name
    by_name = dict(zip(cases, (r["api"] for r in results), strict=True))
    # the rules did something (so agreement is not agreement on a no-op)
    muted, bypassed = by_name["muted upscale"], by_name["bypassed upscale"]
    assert all(n["class_type"] != "LatentUpscaleBy" for n in muted.values())
    assert all(n["class_type"] != "LatentUpscaleBy" for n in bypassed.values())
    assert "latent_image" not in muted["11"]["inputs"]  # fed by the muted node: missing, as on the canvas
    assert bypassed["11"]["inputs"]["latent_image"] == ["3", 0]  # passed through the bypassed node
    rerouted = by_name["reroute and note"]
    assert {n["class_type"] for n in rerouted.values()}.isdisjoint({"Reroute", "Note"})
    encodes = [n for n in rerouted.values() if n["class_type"] == "CLIPTextEncode"]
    assert all(e["inputs"]["clip"] == ["4", 1] for e in encodes)
    assert by_name["primitive seed"]["3"]["inputs"]["seed"] == 1234
    assert "samples" in by_name["converted widget, dead link"]["8"]["inputs"]
    assert "vae" not in by_name["converted widget, dead link"]["8"]["inputs"]
    assert by_name["converted widget, dead link"]["3"]["inputs"]["steps"] == 20
    short = by_name["no control value, dict values"]
    assert short["3"]["inputs"]["steps"] == 3 and short["3"]["inputs"]["scheduler"] == "karras"
    assert short["5"]["inputs"] == {"width": 128, "height": 64, "batch_size": 2}
    blank = by_name["no values where no default"]
    assert [blank[i]["inputs"]["text"] for i in ("6", "7")] == ["", ""]  # a prompt starts empty
    assert blank["3"]["inputs"]["sampler_name"] == "euler" and blank["3"]["inputs"]["seed"] == 0


def test_node_converter_reports_malformed_input(registry_and_info):
    _, info, _ = registry_and_info
    looped = load("txt2img.json")
    definition = wrap_in_subgraph(looped, looped, {6}, 40)
    definition["nodes"][0]["type"] = definition["id"]
    results = convert_in_node([{"nodes": [{"id": 1}], "links": []}, {"nodes": [], "links": [7]},
                               {"nodes": [], "links": [], "definitions": {"subgraphs": [{"id": "x"}]}}, looped],
                              info)
    assert "malformed node entry" in results[0]["error"]
    assert "malformed link entry" in results[1]["error"]
    assert "malformed subgraph definition" in results[2]["error"]
    assert results[3]["error"].startswith("node 40:6: subgraph 'wrapped' contains itself")


def widget_variants() -> dict[str, dict]:
    """Saved values missing, short, partial dicts, control values present or not, a primitive feeding several
    widgets, a chain of Reroutes."""
    out = {}
    missing = load("txt2img.json")
    for kind in ("SaveImage", "CheckpointLoaderSimple", "KSampler"):
        del node_of(missing, kind)["widgets_values"]
    node_of(missing, "EmptyLatentImage")["widgets_values"] = [128]
    out["missing and short values"] = missing

    partial = load("txt2img-sdxl.json")
    advanced = [n for n in partial["nodes"] if n["type"] == "KSamplerAdvanced"]
    advanced[0]["widgets_values"] = ["enable", 7, 25, 7.0, "dpmpp_2m", "karras", 0, 20, "enable"]  # no control
    advanced[1]["widgets_values"] = {"noise_seed": 9, "steps": 30}
    out["noise_seed without control, partial dict"] = partial

    shared = load("txt2img.json")
    sampler, latent = node_of(shared, "KSampler"), node_of(shared, "EmptyLatentImage")
    shared["nodes"].append({"id": 60, "type": "PrimitiveNode", "pos": [0, 0], "mode": 0,
                            "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "width"}}],
                            "widgets_values": [96, "fixed"]})
    shared["nodes"].append({"id": 61, "type": "Reroute", "pos": [0, 0], "mode": 0,
                            "inputs": [{"name": "", "type": "*", "link": None}],
                            "outputs": [{"name": "", "type": "INT", "links": []}]})
    shared["nodes"].append({"id": 62, "type": "Reroute", "pos": [0, 0], "mode": 0,
                            "inputs": [{"name": "", "type": "*", "link": None}],
                            "outputs": [{"name": "", "type": "INT", "links": []}]})
    latent["inputs"] = [{"name": "width", "type": "INT", "link": add_link(shared, 60, 0, latent["id"], 0, "INT"),
                         "widget": {"name": "width"}},
                        {"name": "height", "type": "INT", "link": add_link(shared, 62, 0, latent["id"], 1, "INT"),
                         "widget": {"name": "height"}}]
    node_of(shared, "Reroute")["inputs"][0]["link"] = add_link(shared, 60, 0, 61, 0, "INT")
    shared["nodes"][-1]["inputs"][0]["link"] = add_link(shared, 61, 0, 62, 0, "INT")
    sampler["inputs"].append({"name": "steps", "type": "INT", "link": None, "widget": {"name": "steps"}})
    out["primitive to several widgets through reroutes"] = shared
    return out


def test_converters_agree_on_missing_values_and_control_values(registry_and_info):
    registry, info, env = registry_and_info
    cases = widget_variants()
    results = convert_in_node(list(cases.values()), info)
    for (name, workflow), result in zip(cases.items(), results, strict=True):
        assert result == {"api": ui_to_api(copy.deepcopy(workflow), registry, env)}, name
    by_name = dict(zip(cases, (r["api"] for r in results), strict=True))
    missing = by_name["missing and short values"]
    assert missing["9"]["inputs"]["filename_prefix"] == "ComfyUI"
    assert missing["4"]["inputs"]["ckpt_name"] == "first-listed.safetensors"
    assert {k: missing["3"]["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name", "denoise")} == \
        {"seed": 0, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "denoise": 1.0}
    assert missing["5"]["inputs"] == {"width": 128, "height": 512, "batch_size": 1}
    partial = by_name["noise_seed without control, partial dict"]
    assert partial["10"]["inputs"]["noise_seed"] == 7 and partial["10"]["inputs"]["steps"] == 25
    assert partial["10"]["inputs"]["end_at_step"] == 20 and partial["10"]["inputs"]["return_with_leftover_noise"] \
        == "enable"
    assert partial["11"]["inputs"]["noise_seed"] == 9 and partial["11"]["inputs"]["add_noise"] == "enable"
    assert partial["11"]["inputs"]["end_at_step"] == 10000
    shared = by_name["primitive to several widgets through reroutes"]
    assert shared["5"]["inputs"] == {"width": 96, "height": 96, "batch_size": 1}


def test_converters_agree_on_subgraphs_nested_two_levels(registry_and_info):
    registry, info, env = registry_and_info
    plain = ui_to_api(load("txt2img.json"), registry, env)
    once = load("txt2img.json")
    wrap_in_subgraph(once, once, {6, 7, 3, 5}, 20, name="sample")  # prompts, latent, sampler
    twice = copy.deepcopy(once)
    wrap_in_subgraph(twice, twice["definitions"]["subgraphs"][0], {3, 5}, 30, name="inner sampler")
    cases = {"once": once, "twice": twice}
    results = convert_in_node(list(cases.values()), info)
    for (name, workflow), result in zip(cases.items(), results, strict=True):
        assert result == {"api": ui_to_api(copy.deepcopy(workflow), registry, env)}, name
    assert results[0]["api"] == renamed(plain, {"6": "20:6", "7": "20:7", "3": "20:3", "5": "20:5"})
    assert results[1]["api"] == renamed(plain, {"6": "20:6", "7": "20:7", "3": "20:30:3", "5": "20:30:5"})


def test_node_converter_fills_combo_defaults_in_both_object_info_shapes():
    info = {"Pick2": {"input": {"required": {"listed": [["a", "b"], {}], "typed": ["COMBO", {"options": ["x", "y"]}],
                                             "given": [["p", "q"], {"default": "q"}]}},
                      "input_order": {"required": ["listed", "typed", "given"]}, "output": [], "name": "Pick2"}}
    workflow = {"nodes": [{"id": 1, "type": "Pick2", "mode": 0}], "links": []}
    (result,) = convert_in_node([workflow], info)
    assert result["api"]["1"]["inputs"] == {"listed": "a", "typed": "x", "given": "q"}
