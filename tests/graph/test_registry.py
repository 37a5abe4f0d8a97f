from __future__ import annotations

import importlib.metadata

import pytest

from graph.node import Node, Output
from graph.registry import NodeRegistry, RegistryError
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


def test_bad_declarations_rejected():
    from graph.node import Int

    with pytest.raises(TypeError, match="duplicate"):
        type("Dup", (Node,), {"inputs": [Int("a"), Int("a")]})
    with pytest.raises(TypeError, match="hidden"):
        type("Hid", (Node,), {"hidden": ("password",)})
