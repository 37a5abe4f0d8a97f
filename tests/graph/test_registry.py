from __future__ import annotations

import importlib.metadata

import pytest

from graph.node import Int, Node, Output, String
from graph.registry import NodeRegistry, RegistryError
from graph.types import INT, STRING
from tests.graph.testnodes import Number, Pick, Seeded, build_registry

PLUGIN = """
from graph.node import Int, Node, Output

class {name}(Node):
    category = "plugin"
    inputs = [Int("x", default=1)]
    outputs = [Output("INT")]

    def execute(self, x):
        return (x * 2,)

NODE_CLASSES = [{name}]
"""


def test_custom_nodes_folder_loads_good_and_skips_broken(tmp_path, caplog):
    (tmp_path / "good.py").write_text(PLUGIN.format(name="Doubler"))
    pkg = tmp_path / "pack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from .impl import Tripler\nNODE_CLASS_MAPPINGS = {'Tripler': Tripler}\n")
    (pkg / "impl.py").write_text(PLUGIN.format(name="Tripler"))
    (tmp_path / "broken.py").write_text("raise ImportError('missing dependency foo')\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "off.py.disabled").write_text("raise SystemExit\n")
    registry = NodeRegistry()
    registry.discover_folder(tmp_path)
    assert "Doubler" in registry and "Tripler" in registry
    assert set(registry.load_errors) == {"custom_nodes/broken.py", "custom_nodes/exits.py",
                                         "custom_nodes/empty.py"}
    assert "missing dependency foo" in registry.load_errors["custom_nodes/broken.py"]
    assert "failed to load" in caplog.text


def test_entry_point_discovery(monkeypatch, tmp_path):
    module = tmp_path / "ep_plugin_mod.py"
    module.write_text(PLUGIN.format(name="EpNode"))
    monkeypatch.syspath_prepend(str(tmp_path))
    good = importlib.metadata.EntryPoint("good", "ep_plugin_mod", "latentloom.nodes")
    bad = importlib.metadata.EntryPoint("bad", "no_such_module_xyz", "latentloom.nodes")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [good, bad])
    registry = NodeRegistry()
    registry.discover_entry_points()
    assert "EpNode" in registry
    assert "ModuleNotFoundError" in registry.load_errors["entry point bad"]


def test_builtin_cannot_be_replaced():
    registry = NodeRegistry()
    registry.register(Number, builtin=True)

    class Number2(Node):
        node_type = "Number"
        outputs = [Output("INT")]

    with pytest.raises(RegistryError, match="built in"):
        registry.register(Number2)


def test_object_info_shape():
    info = build_registry().object_info()
    seeded = info["Seeded"]
    assert seeded["input"]["required"]["seed"] == [
        "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1, "control_after_generate": True}]
    assert seeded["input_order"] == {"required": ["seed", "steps"]}
    assert seeded["output"] == ["INT"] and seeded["output_name"] == ["INT"] and seeded["output_is_list"] == [False]
    assert seeded["name"] == "Seeded" and seeded["category"] == "test" and seeded["output_node"] is False
    assert info["Pick"]["input"]["required"]["choice"] == [["red", "green", "blue"], {"default": "red"}]
    assert info["Show"]["output_node"] is True
    assert info["Show"]["input"]["optional"] == {"label": ["STRING", {"default": ""}]}
    assert info["Hidden"]["input"]["hidden"] == {"prompt": "PROMPT", "unique_id": "UNIQUE_ID",
                                                 "extra_pnginfo": "EXTRA_PNGINFO"}
    assert "BrokenOptions" not in info  # a declaration that raises is left out, the rest still render
    assert Pick.info()["display_name"] == "Pick"
    assert Seeded.input("seed").control_after_generate


def test_object_info_has_every_key_comfyui_sends():
    """The keys ComfyUI's /object_info gives a node, flags as booleans and one output tooltip per output, the
    hidden section in input_order, and python_module telling built-ins from node packs as ComfyUI's front end
    reads it (its first dotted part)."""

    class Flagged(Node):
        category = "test/flags"
        display_name = "Flagged node"
        description = "why it exists"
        deprecated = True
        experimental = True
        hidden = ("unique_id", "context")
        inputs = [Int("n", default=1), String("note", default="", optional=True)]
        outputs = [Output(INT, "count", tooltip="how many"), Output(STRING, is_list=True)]

    info = Flagged.info()
    assert set(info) == {"input", "input_order", "output", "output_is_list", "output_name", "output_tooltips", "name",
                         "display_name", "description", "python_module", "category", "output_node", "deprecated",
                         "experimental", "api_node"}
    assert info["deprecated"] is True and info["experimental"] is True and info["api_node"] is False
    assert Number.info()["deprecated"] is False and Number.info()["experimental"] is False
    assert info["input_order"] == {"required": ["n"], "optional": ["note"], "hidden": ["unique_id"]}
    assert info["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}  # `context` is ours, never on the wire
    assert info["output_tooltips"] == ["how many", ""]
    assert info["output_is_list"] == [False, True] and info["output_name"] == ["count", "STRING"]
    assert info["display_name"] == "Flagged node" and info["description"] == "why it exists"


def test_python_module_names_core_and_packs_as_comfyui_does():
    from graph.node import wire_module

    assert wire_module("nodes.loaders") == "nodes.loaders"  # built in: the front end files it under core
    assert wire_module("comfy_extras.nodes_mask") == "comfy_extras.nodes_mask"
    assert wire_module("latentloom_custom_nodes.my_pack") == "custom_nodes.my_pack"  # a custom_nodes/ folder file
    assert wire_module("latentloom_custom_nodes.my_pack.impl") == "custom_nodes.my_pack"
    assert wire_module("ep_pack.nodes") == "custom_nodes.ep_pack"  # a pack installed by entry point


def test_python_module_of_a_custom_nodes_file(tmp_path):
    (tmp_path / "doubler_pack.py").write_text(PLUGIN.format(name="DoublerPack"))
    registry = NodeRegistry()
    registry.discover_folder(tmp_path)
    assert registry.object_info()["DoublerPack"]["python_module"] == "custom_nodes.doubler_pack"
    from nodes import build_registry as build_builtin

    builtin = build_builtin(plugins=False).object_info()
    assert builtin["KSampler"]["python_module"] == "nodes.sampling"


def test_bad_declarations_rejected():
    from graph.node import Int

    with pytest.raises(TypeError, match="duplicate"):
        type("Dup", (Node,), {"inputs": [Int("a"), Int("a")]})
    with pytest.raises(TypeError, match="hidden"):
        type("Hid", (Node,), {"hidden": ("password",)})
