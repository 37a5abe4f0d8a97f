"""The canvas' UI → API conversion (web/js/convert.js, run by node) agrees with the server's (graph/ui_format.py)
on every shipped workflow and on variants that use each canvas-only rule (mute, bypass, reroute, primitive,
note, converted widget, dead link, dict widgets_values)."""

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

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
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
    registry = build_registry(env, plugins=False)
    return registry, registry.object_info(env)


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
    return out


def test_converters_agree_on_every_shipped_workflow(registry_and_info):
    registry, info = registry_and_info
    assert len(SHIPPED) >= 9
    workflows = [json.loads(p.read_text()) for p in SHIPPED]
    results = convert_in_node(workflows, info)
    for path, workflow, result in zip(SHIPPED, workflows, results, strict=True):
        expected = ui_to_api(copy.deepcopy(workflow), registry)
        assert result == {"api": expected}, path.name


def test_converters_agree_on_canvas_only_rules(registry_and_info):
    registry, info = registry_and_info
    cases = variants()
    results = convert_in_node(list(cases.values()), info)
    for (name, workflow), result in zip(cases.items(), results, strict=True):
        assert result == {"api": ui_to_api(copy.deepcopy(workflow), registry)}, name
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


def test_node_converter_reports_malformed_input(registry_and_info):
    _, info = registry_and_info
    results = convert_in_node([{"nodes": [{"id": 1}], "links": []}, {"nodes": [], "links": [7]}], info)
    assert "malformed node entry" in results[0]["error"]
    assert "malformed link entry" in results[1]["error"]
