"""A V3 node pack (comfy_api.latest) with ComfyUI's dynamic inputs, written for Latent Loom's tests: Autogrow groups
(by prefix and by names), a DynamicCombo whose options bring their own inputs, and MatchType sockets."""

import torch
from comfy_api.latest import ComfyExtension, io


class V3Stack(io.ComfyNode):
    """Stacks the images connected to its growing `images` group (at least one, up to four)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        template = io.Autogrow.TemplatePrefix(input=io.Image.Input("image"), prefix="image_", min=1, max=4)
        return io.Schema(node_id="V3Stack", category="v3 dynamic", inputs=[io.Autogrow.Input("images",
                                                                                              template=template)],
                         outputs=[io.Image.Output(), io.String.Output(id="slots")])

    @classmethod
    def execute(cls, images: io.Autogrow.Type) -> io.NodeOutput:
        return io.NodeOutput(torch.cat(list(images.values())), ",".join(images))


class V3NamedSum(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        template = io.Autogrow.TemplateNames(input=io.Int.Input("term", default=0), names=["a", "b", "c"], min=0)
        return io.Schema(node_id="V3NamedSum", category="v3 dynamic",
                         inputs=[io.Autogrow.Input("terms", template=template)], outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, terms) -> io.NodeOutput:
        return io.NodeOutput(sum(value * weight for (name, value), weight in
                                 zip(sorted(terms.items()), (1, 10, 100), strict=False)))


class V3Adjust(io.ComfyNode):
    """A DynamicCombo: "scale" brings a factor, "offset" an amount and an optional repeat count."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Adjust", category="v3 dynamic", inputs=[
            io.Image.Input("image"),
            io.DynamicCombo.Input("mode", options=[
                io.DynamicCombo.Option("scale", [io.Float.Input("factor", default=2.0)]),
                io.DynamicCombo.Option("offset", [io.Float.Input("amount", force_input=True),
                                                  io.Int.Input("repeat", default=1, optional=True)])])],
            outputs=[io.Image.Output(), io.String.Output(id="seen")])

    @classmethod
    def execute(cls, image, mode: io.DynamicCombo.Type) -> io.NodeOutput:
        seen = ",".join(f"{k}={v}" for k, v in sorted(mode.items()))
        if mode["mode"] == "scale":
            return io.NodeOutput(image * mode["factor"], seen)
        return io.NodeOutput(image + mode["amount"] * mode.get("repeat", 1), seen)


class V3Either(io.ComfyNode):
    """MatchType: both inputs and the output share one template, any type."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        template = io.MatchType.Template("either")
        return io.Schema(node_id="V3Either", category="v3 dynamic", inputs=[
            io.Boolean.Input("first", default=True),
            io.MatchType.Input("a", template=template), io.MatchType.Input("b", template=template)],
            outputs=[io.MatchType.Output(template=template, display_name="picked")])

    @classmethod
    def execute(cls, first, a, b) -> io.NodeOutput:
        return io.NodeOutput(a if first else b)


class V3Float(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Float", category="v3 dynamic", inputs=[io.Float.Input("value", default=0.0)],
                         outputs=[io.Float.Output()])

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        return io.NodeOutput(value)


class DynamicExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [V3Stack, V3NamedSum, V3Adjust, V3Either, V3Float]


async def comfy_entrypoint() -> DynamicExtension:
    return DynamicExtension()
