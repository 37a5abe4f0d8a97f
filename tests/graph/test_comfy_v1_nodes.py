"""ComfyUI V1 node packs (tests/packs/) loaded from a data directory's custom_nodes/ and run by the engine."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pytest

from graph.executor import Executor
from graph.registry import NodeRegistry
from graph.validation import validate_prompt
from nodes import latent
from nodes.environment import Environment

PACKS = Path(__file__).resolve().parents[1] / "packs"


class PackEngine:
    core_modules: tuple = (latent,)  # the built-in node modules registered (all of them cost seconds of imports)

    def __init__(self, data_dir: Path, packs: tuple[str, ...] = ("v1_pack",)) -> None:
        self.env = Environment(data_dir)
        self.env.ensure_dirs()
        for pack in packs:
            source = PACKS / pack
            target = self.env.custom_nodes_dir / pack
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(source, target)
        self.registry = NodeRegistry()
        for module in self.core_modules:
            for cls in module.NODE_CLASSES:
                self.registry.register(cls, builtin=True)
        self.registry.discover_folder(self.env.custom_nodes_dir, self.env)
        self.executor = Executor(env=self.env)
        self.events: list[tuple[str, dict]] = []

    def validate(self, prompt):
        return validate_prompt(prompt, self.registry, self.env)

    def run(self, prompt, prompt_id="p", ok=True, extra_data=None):
        validation = self.validate(prompt)
        assert validation.ok, validation.response()
        self.events = []
        result = self.executor.execute(validation.prompt, prompt_id, lambda e, d: self.events.append((e, d)),
                                       extra_data)
        if ok:
            assert result.status == "success", result.error and result.error["exception_message"]
        return result

    def value(self, prompt, node_id, slot=0):
        self.run(prompt)
        keys = self.executor.cache_keys(self.validate(prompt).prompt)
        return self.executor.cache.get(keys[node_id]).outputs[slot]


def calls():
    return sys.modules["latentloom_custom_nodes.v1_pack.basic_nodes"].CALLS


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return PackEngine(tmp_path_factory.mktemp("v1data"))


def show(node: str, slot: int = 0) -> dict:
    return {"out": {"class_type": "V1Show", "inputs": {"value": [node, slot]}}}


def test_declaration_is_what_the_pack_wrote(engine):
    info = engine.registry.object_info(engine.env)["V1Options"]
    required = info["input"]["required"]
    assert required["count"] == ["INT", {"default": 3, "min": 0, "max": 10, "step": 1,
                                         "control_after_generate": True, "tooltip": "how many"}]
    assert required["ratio"][1] == {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                                    "display": "slider"}
    assert required["text"] == ["STRING", {"default": "hi", "multiline": True, "dynamicPrompts": True}]
    assert required["flag"][1]["label_on"] == "yes"
    assert required["mode"] == [["add", "mul"], {"default": "mul"}]
    assert required["kind"] == ["COMBO", {"options": ["a", "b"], "default": "b"}]
    assert required["image"] == [["x.png", "y.png"], {"image_upload": True}]
    assert required["linked"] == ["INT", {"default": 1, "forceInput": True}]
    assert info["input"]["optional"] == {"anything": ["*", {}]}
    assert info["input"]["hidden"] == {"node_id": "UNIQUE_ID", "workflow": "PROMPT", "png": "EXTRA_PNGINFO"}
    assert info["input_order"]["required"] == ["count", "ratio", "text", "flag", "mode", "kind", "image", "linked"]
    assert info["output"] == ["STRING", "INT"] and info["output_name"] == ["summary", "doubled"]
    assert info["output_tooltips"] == ["what the node got", "count times two"]
    assert info["display_name"] == "V1 Every Option" and info["category"] == "v1 pack/options"
    assert info["description"] == "Every INPUT_TYPES option ComfyUI defines."
    assert info["deprecated"] is True and info["experimental"] is True and info["output_node"] is False
    assert info["python_module"] == "custom_nodes.v1_pack"
    assert engine.registry.object_info(engine.env)["V1Show"]["output_node"] is True
    assert engine.registry.object_info(engine.env)["V1ListOut"]["output_is_list"] == [True, False]
    assert engine.registry.get("V1Show").not_idempotent


def test_inputs_hidden_values_and_any_type(engine):
    prompt = {"n": {"class_type": "V1Number", "inputs": {"value": 4}},
              "o": {"class_type": "V1Options", "inputs": {
                  "count": 3, "ratio": 0.25, "text": "t", "flag": False, "mode": "add", "kind": "a",
                  "image": "y.png", "linked": ["n", 0], "anything": ["n", 0]}},
              **show("o")}
    summary = engine.value(prompt, "o")[0]
    assert summary == "7|0.25|t|False|a|y.png|4|o|['n', 'o', 'out']"
    assert engine.value(prompt, "o", 1) == [6]


def test_any_type_declared_as_an_always_equal_str(engine):
    info = engine.registry.object_info(engine.env)["V1Passthrough"]
    assert info["input"]["required"]["value"] == ["*", {}] and info["output"] == ["*"]
    assert type(engine.registry.get("V1Passthrough").input("value").type) is str  # not the pack's proxy
    prompt = {"n": {"class_type": "V1Number", "inputs": {"value": 41}},
              "p": {"class_type": "V1Passthrough", "inputs": {"value": ["n", 0]}},
              "e": {"class_type": "V1Even", "inputs": {"value": 2, "limit": ["p", 0]}}, **show("p")}
    assert engine.value(prompt, "p") == [41]
    assert engine.validate(prompt).ok  # "*" feeds an INT input


def test_default_validation_still_applies(engine):
    bad = {"o": {"class_type": "V1Options", "inputs": {
        "count": 11, "ratio": 0.5, "text": "", "flag": True, "mode": "pow", "kind": "a", "image": "x.png",
        "linked": 1}}, **show("o")}
    errors = engine.validate(bad).node_errors["o"]["errors"]
    kinds = {e["type"] for e in errors}
    assert {"value_bigger_than_max", "value_not_in_list"} <= kinds


def test_lazy_inputs_evaluate_only_the_chosen_branch(engine):
    for use_first, expected in ((True, 110), (False, 120)):
        calls().clear()
        prompt = {"a": {"class_type": "V1Number", "inputs": {"value": 110}},
                  "b": {"class_type": "V1Number", "inputs": {"value": 120}},
                  "l": {"class_type": "V1Lazy", "inputs": {"use_first": use_first, "first": ["a", 0],
                                                           "second": ["b", 0]}},
                  **show("l")}
        assert engine.value(prompt, "l") == [expected]
        assert [c for c in calls() if c[0] == "V1Number"] == [("V1Number", expected)]  # the other never ran


def test_list_outputs_and_list_inputs(engine):
    prompt = {"s": {"class_type": "V1ListOut", "inputs": {"count": 4}},
              "sq": {"class_type": "V1PerItem", "inputs": {"x": ["s", 0]}},
              "sum": {"class_type": "V1ListIn", "inputs": {"items": ["sq", 0], "scale": 2}},
              **show("sum")}
    assert engine.value(prompt, "s") == [1, 2, 3, 4]
    assert engine.value(prompt, "sq") == [1, 4, 9, 16]
    assert engine.value(prompt, "sum") == [60]


def test_is_changed_decides_caching(engine):
    path = engine.env.input_dir / "note.txt"
    path.write_text("one")
    prompt = {"r": {"class_type": "V1ReadFile", "inputs": {"path": str(path)}}, **show("r")}
    calls().clear()
    assert engine.value(prompt, "r") == ["one"]
    engine.run(prompt)
    assert calls().count(("V1ReadFile", str(path))) == 1  # unchanged: cached
    time.sleep(0.01)
    path.write_text("two")
    assert engine.value(prompt, "r") == ["two"]
    assert calls().count(("V1ReadFile", str(path))) == 2
    always = {"t": {"class_type": "V1Always", "inputs": {}}, **show("t")}
    calls().clear()
    engine.run(always)
    engine.run(always)
    assert calls().count(("V1Always", None)) == 2  # NaN: never cached
    assert math.isnan(engine.registry.get("V1Always").fingerprint({}, engine.env))


def test_validate_inputs_replaces_default_checks_of_its_inputs(engine):
    ok = {"e": {"class_type": "V1Even", "inputs": {"value": 50, "limit": 4}}, **show("e")}
    assert engine.value(ok, "e") == [50]  # max 10 not enforced: VALIDATE_INPUTS takes `value`
    odd = {"e": {"class_type": "V1Even", "inputs": {"value": 3, "limit": 4}}, **show("e")}
    errors = engine.validate(odd).node_errors["e"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and "value 3 is odd" in errors[0]["details"]
    over = {"e": {"class_type": "V1Even", "inputs": {"value": 2, "limit": 11}}, **show("e")}
    assert engine.validate(over).node_errors["e"]["errors"][0]["type"] == "value_bigger_than_max"


def test_validate_inputs_with_input_types(engine):
    from_int = {"n": {"class_type": "V1Number", "inputs": {"value": 5}},
                "h": {"class_type": "V1TypedLink", "inputs": {"number": ["n", 0]}}, **show("h")}
    assert engine.value(from_int, "h") == [2.5]
    from_text = {"t": {"class_type": "V1Text", "inputs": {"text": "7"}},
                 "h": {"class_type": "V1TypedLink", "inputs": {"number": ["t", 0]}}, **show("h")}
    result = engine.run(from_text, ok=False)
    assert result.status == "error" and result.error["node_id"] == "h"
    assert "number must be INT or FLOAT, not STRING" in result.error["exception_message"]


def test_ui_result_reaches_outputs_and_events(engine):
    prompt = {"n": {"class_type": "V1Number", "inputs": {"value": 9}}, **show("n")}
    result = engine.run(prompt)
    assert result.outputs["out"] == {"text": ["9"]}
    executed = [d for e, d in engine.events if e == "executed"]
    assert executed and executed[0]["output"] == {"text": ["9"]}


def test_progress_and_interrupt_through_comfy_modules(engine):
    prompt = {"s": {"class_type": "V1Steps", "inputs": {"steps": 3, "stop_at": -1}}, **show("s")}
    engine.run(prompt)
    progress = [(d["value"], d["max"]) for e, d in engine.events if e == "progress" and d["node"] == "s"]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    stopped = {"s": {"class_type": "V1Steps", "inputs": {"steps": 5, "stop_at": 2}}, **show("s")}
    result = engine.run(stopped, ok=False)
    assert result.status == "interrupted"
    assert [d["value"] for e, d in engine.events if e == "progress"] == [1, 2]


def test_pack_modules_resolve_to_the_compatibility_layer(engine):
    result = engine.run({"h": {"class_type": "V1Hello", "inputs": {"sampler": "euler", "scheduler": "normal"}}})
    assert result.outputs["h"]["modules"] == ["comfy_compat.nodes", "comfy_compat.server",
                                              "comfy_compat.folder_paths"]
    where = engine.run({"w": {"class_type": "V1WhereFrom", "inputs": {}}}).outputs["w"]
    assert where == {"by_path": ["comfy_compat.nodes", "comfy_compat.server"], "on_sys_path": ["comfy_compat.server"]}
    import nodes
    import server

    assert nodes.__name__ == "nodes" and hasattr(nodes, "build_registry")  # ours are untouched
    assert server.__name__ == "server" and not hasattr(server, "PromptServer")


def test_folder_paths_maps_onto_the_data_directory(engine):
    loras = engine.env.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "style.safetensors").write_bytes(b"x")
    info = engine.registry.object_info(engine.env)["V1Files"]
    assert "style.safetensors" in info["input"]["required"]["name"][0]  # read fresh, as ComfyUI
    prompt = {"f": {"class_type": "V1Files", "inputs": {"name": "style.safetensors"}}, **show("f")}
    assert engine.value(prompt, "f") == [str((loras / "style.safetensors").resolve())]
    assert engine.value(prompt, "f", 1) == [str(engine.env.output_dir)]
    import folder_paths

    assert folder_paths.get_full_path("loras", "../../custom_nodes/v1_pack/__init__.py") is None
    with pytest.raises(FileNotFoundError, match=r"'loras' with filename 'nope\.safetensors'"):
        folder_paths.get_full_path_or_raise("loras", "nope.safetensors")
    assert folder_paths.annotated_filepath("a.png [output]") == ("a.png", str(engine.env.output_dir))
    _, name, counter, sub, _ = folder_paths.get_save_image_path("run/img", str(engine.env.output_dir))
    assert (name, counter, sub) == ("img", 1, "run")
    with pytest.raises(ValueError, match="outside the output folder"):
        folder_paths.get_save_image_path("../escape/img", str(engine.env.output_dir))


def test_comfyui_root_seen_by_packs_is_the_data_directory(engine):
    import inspect

    from comfy_compat.server import PromptServer  # what `from server import PromptServer` gives a pack

    assert Path(inspect.getfile(PromptServer)).parent == engine.env.data_dir  # packs that write there stay in it


def test_pack_calls_a_core_node(engine):
    latent = engine.value({"c": {"class_type": "V1CoreLatent", "inputs": {"width": 64}}, **show("c")}, "c")[0]
    assert tuple(latent["samples"].shape) == (1, 4, 8, 8)


BROKEN = ("broken_import", "broken_exit.py", "broken_decls", "broken_web", "broken_runtime", "broken_v3", "v1_pack")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    data = tmp_path_factory.mktemp("broken")
    (data / "custom_nodes").mkdir()
    (data / "custom_nodes" / "broken_syntax.py").write_text("NODE_CLASS_MAPPINGS = {\n")
    return PackEngine(data, BROKEN)


def test_broken_packs_are_reported_and_skipped(broken, caplog):
    errors = broken.registry.load_errors
    assert "No module named 'definitely_missing_module_xyz'" in errors["custom_nodes/broken_import"]
    assert "requirements not installed: definitely-missing-module-xyz>=1.0" in errors["custom_nodes/broken_import"]
    assert "numpy" not in errors["custom_nodes/broken_import"]
    assert errors["custom_nodes/broken_syntax.py"].startswith("SyntaxError")
    assert errors["custom_nodes/broken_exit.py"].startswith("SystemExit")
    assert errors["custom_nodes/broken_v3"] == "RuntimeError: extension setup failed"
    assert "V1Options" in broken.registry  # a good pack in the same folder still loads


def test_bad_declarations_are_skipped_one_by_one(broken):
    errors = broken.registry.load_errors
    label = "custom_nodes/broken_decls node "
    assert "FUNCTION 'missing'" in errors[label + "BadFunction"]
    assert "INPUT_TYPES exploded" in errors[label + "BadInputs"]
    assert "RETURN_TYPES must be a tuple" in errors[label + "BadReturn"]
    assert "options must be a dict" in errors[label + "BadOption"]
    assert "not a class" in errors[label + "NotAClass"]
    assert "built in and cannot be replaced" in errors[label + "EmptyLatentImage"]
    assert broken.registry.get("EmptyLatentImage").__module__ == "nodes.latent"
    assert "StillGood" in broken.registry and "BadFunction" not in broken.registry


def test_web_directory_outside_the_pack_is_refused(broken):
    assert "leaves the pack's folder" in broken.registry.load_errors["custom_nodes/broken_web WEB_DIRECTORY"]
    assert broken.registry.packs["broken_web"].web_directory is None and "WebNode" in broken.registry
    assert broken.registry.packs["v1_pack"].web_directory.name == "web"


@pytest.mark.parametrize(("node", "message"), [
    ("WrongCount", "returned 2 values but declares 1 outputs"),
    ("NotATuple", "returned int, not a tuple of outputs"),
    ("Expands", "node expansion ('expand' in the result) is not supported"),
])
def test_results_that_break_the_declaration(broken, node, message):
    result = broken.run({"n": {"class_type": node, "inputs": {}}}, ok=False)
    assert result.status == "error" and message in result.error["exception_message"]


def test_missing_method_names_method_node_and_pack(broken):
    prompt = {"s": {"class_type": "ThingSource", "inputs": {}},
              "c": {"class_type": "CallsMissing", "inputs": {"model": ["s", 0]}}}
    result = broken.run(prompt, ok=False)
    assert result.error["node_id"] == "c"
    assert result.error["exception_message"] == (
        "node CallsMissing (pack broken_runtime) called MODEL.set_model_unet_function_wrapper on its input "
        "'model', which Latent Loom's MODEL does not offer")


def test_latent_preview_callback_reports_progress(engine):
    engine.run({"c": {"class_type": "V1Callback", "inputs": {"steps": 3}}, **show("c")})
    assert [(d["value"], d["max"]) for e, d in engine.events if e == "progress"] == [(1, 3), (2, 3), (3, 3)]


def test_comfy_helpers_map_onto_ours(engine, tmp_path):
    import comfy.model_management as mm
    import comfy.utils
    import node_helpers
    import torch

    assert mm.get_torch_device() == engine.env.model_manager().device
    assert mm.intermediate_device() == torch.device("cpu")
    assert isinstance(mm.get_free_memory(), int) and mm.get_total_memory() >= mm.get_free_memory() > 0
    mm.soft_empty_cache()
    assert not mm.processing_interrupted()  # outside a run
    assert issubclass(mm.InterruptProcessingException, Exception)
    resized = comfy.utils.common_upscale(torch.rand(1, 3, 8, 12), 6, 4, "bilinear", "disabled")
    assert tuple(resized.shape) == (1, 3, 4, 6)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x05touch\x85R.")
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused: this pickle needs code to load"):
        comfy.utils.load_torch_file(str(evil))
    good = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, good, metadata={"k": "v"})
    state, meta = comfy.utils.load_torch_file(str(good), return_metadata=True)
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"k": "v"}
    cond = node_helpers.conditioning_set_values([(torch.zeros(1), {"a": [1]})], {"a": [2], "b": 3}, append=True)
    assert cond[0][1] == {"a": [1, 2], "b": 3}
