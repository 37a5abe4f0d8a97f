"""Nodes that break at run time: wrong result shapes, a method our MODEL does not offer, node expansion."""


class Thing:
    """Stands for an object of another engine's type (a pack's own MODEL)."""


class ThingSource:
    CATEGORY = "broken"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (Thing(),)


class CallsMissing:
    CATEGORY = "broken"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        return (model.set_model_unet_function_wrapper(None),)


class WrongCount:
    CATEGORY = "broken"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return (1, 2)


class NotATuple(WrongCount):
    def run(self):
        return 5


class Expands(WrongCount):
    def run(self):
        return {"result": (1,), "expand": {}}


NODE_CLASS_MAPPINGS = {"ThingSource": ThingSource, "CallsMissing": CallsMissing, "WrongCount": WrongCount,
                       "NotATuple": NotATuple, "Expands": Expands}
