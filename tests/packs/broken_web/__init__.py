"""A pack whose WEB_DIRECTORY leaves its folder: refused; its nodes still load."""


class WebNode:
    CATEGORY = "broken"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return {}


NODE_CLASS_MAPPINGS = {"WebNode": WebNode}
WEB_DIRECTORY = "../.."
