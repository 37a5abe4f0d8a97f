"""A pack with broken declarations next to a good one: each bad node is skipped alone."""


class _Base:
    CATEGORY = "broken"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 1})}}

    def run(self, x):
        return (x,)


class BadFunction(_Base):
    FUNCTION = "missing"


class BadInputs(_Base):
    @classmethod
    def INPUT_TYPES(cls):
        raise RuntimeError("INPUT_TYPES exploded")


class BadReturn(_Base):
    RETURN_TYPES = "INT"


class BadOption(_Base):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", "not a dict")}}


class StillGood(_Base):
    pass


NODE_CLASS_MAPPINGS = {"BadFunction": BadFunction, "BadInputs": BadInputs, "BadReturn": BadReturn,
                       "BadOption": BadOption, "NotAClass": lambda: None, "EmptyLatentImage": StillGood,
                       "StillGood": StillGood}
