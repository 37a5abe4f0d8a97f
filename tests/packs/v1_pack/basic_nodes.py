"""Declaration options, lazy inputs, lists, IS_CHANGED and VALIDATE_INPUTS."""

import math
import os


class V1Options:
    DESCRIPTION = "Every INPUT_TYPES option ComfyUI defines."
    CATEGORY = "v1 pack/options"
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("summary", "doubled")
    OUTPUT_TOOLTIPS = ("what the node got", "count times two")
    FUNCTION = "run"
    DEPRECATED = True
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "count": ("INT", {"default": 3, "min": 0, "max": 10, "step": 1, "control_after_generate": True,
                                  "tooltip": "how many"}),
                "ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "round": 0.01,
                                    "display": "slider"}),
                "text": ("STRING", {"default": "hi", "multiline": True, "dynamicPrompts": True}),
                "flag": ("BOOLEAN", {"default": True, "label_on": "yes", "label_off": "no"}),
                "mode": (["add", "mul"], {"default": "mul"}),
                "kind": ("COMBO", {"options": ["a", "b"], "default": "b"}),
                "image": (["x.png", "y.png"], {"image_upload": True}),
                "linked": ("INT", {"default": 1, "forceInput": True}),
            },
            "optional": {"anything": ("*", {})},
            "hidden": {"node_id": "UNIQUE_ID", "workflow": "PROMPT", "png": "EXTRA_PNGINFO"},
        }

    def run(self, count, ratio, text, flag, mode, kind, image, linked, anything=None, node_id=None, workflow=None,
            png=None):
        value = count + linked if mode == "add" else count * linked
        summary = f"{value}|{ratio}|{text}|{flag}|{kind}|{image}|{anything!r}|{node_id}|{sorted(workflow)}"
        return (summary, count * 2)


class V1Number:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -1000, "max": 1000})}}

    def make(self, value):
        CALLS.append(("V1Number", value))
        return (value,)


CALLS = []  # what ran, for the tests


class V1Lazy:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    FUNCTION = "pick"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"use_first": ("BOOLEAN", {"default": True}),
                             "first": ("INT", {"lazy": True, "forceInput": True}),
                             "second": ("INT", {"lazy": True, "forceInput": True})}}

    def check_lazy_status(self, use_first, first=None, second=None):
        return ["first"] if use_first else ["second"]

    def pick(self, use_first, first=None, second=None):
        return (first if use_first else second,)


class V1ListOut:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT", "INT")
    RETURN_NAMES = ("items", "count")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 1, "max": 10})}}

    def split(self, count):
        return (list(range(1, count + 1)), count)


class V1ListIn:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "total"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"items": ("INT", {"forceInput": True}), "scale": ("INT", {"default": 1})},
                "hidden": {"node_id": "UNIQUE_ID"}}

    def total(self, items, scale, node_id):
        assert isinstance(scale, list) and isinstance(node_id, list)
        return (sum(items) * scale[0],)


class V1PerItem:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    FUNCTION = "square"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}

    def square(self, x):
        return (x * x,)


class V1ReadFile:
    """Reads a text file from the input folder; IS_CHANGED says when it changed (ComfyUI's caching rule)."""

    CATEGORY = "v1 pack"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "read"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})}}

    @classmethod
    def IS_CHANGED(cls, path):
        return os.path.getmtime(path), open(path).read()

    def read(self, path):
        CALLS.append(("V1ReadFile", path))
        with open(path) as f:
            return (f.read(),)


class V1Always:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    FUNCTION = "tick"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return math.nan

    def tick(self):
        CALLS.append(("V1Always", None))
        return (len(CALLS),)


class V1Even:
    """VALIDATE_INPUTS takes `value`: its own rule replaces the range check (max 10 is not enforced)."""

    CATEGORY = "v1 pack"
    RETURN_TYPES = ("INT",)
    FUNCTION = "same"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 2, "min": 0, "max": 10}),
                             "limit": ("INT", {"default": 5, "min": 0, "max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        return True if value % 2 == 0 else f"value {value} is odd"

    def same(self, value, limit):
        return (value,)


class V1TypedLink:
    """VALIDATE_INPUTS with `input_types`: takes a link of any type, accepts only INT or FLOAT ones."""

    CATEGORY = "v1 pack"
    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "half"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("FLOAT", {"forceInput": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        kind = input_types.get("number")
        return True if kind in ("INT", "FLOAT") else f"number must be INT or FLOAT, not {kind}"

    def half(self, number):
        return (float(number) / 2,)


class V1Text:
    CATEGORY = "v1 pack"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "text"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "x"})}}

    def text(self, text):
        return (text,)


class V1Show:
    """An output node whose result is `{"ui": ..., "result": ...}`."""

    CATEGORY = "v1 pack"
    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True
    NOT_IDEMPOTENT = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*", {"forceInput": True})}}

    def show(self, value):
        return {"ui": {"text": (str(value),)}, "result": (str(value),)}  # a tuple, as many packs write it


BASIC_NODES = {cls.__name__: cls for cls in (V1Options, V1Number, V1Lazy, V1ListOut, V1ListIn, V1PerItem,
                                             V1ReadFile, V1Always, V1Even, V1TypedLink, V1Text, V1Show)}


class AnyType(str):
    """The "any" type as packs write it: a str whose `!=` is always False (and `==` always True)."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = str.__hash__


class V1Passthrough:
    CATEGORY = "v1 pack"
    RETURN_TYPES = (AnyType("*"),)
    FUNCTION = "same"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (AnyType("*"), {})}}

    def same(self, value):
        return (value,)


BASIC_NODES["V1Passthrough"] = V1Passthrough
