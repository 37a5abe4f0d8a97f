"""A node pack in ComfyUI's V3 style (comfy_api.latest), written for Latent Loom's tests."""

import torch
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override


class V3Brighten(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Brighten", display_name="V3 Brighten", category="v3 pack", description="Scales an image.",
            inputs=[io.Image.Input("image", tooltip="what to brighten"),
                    io.Float.Input("factor", default=1.5, min=0.0, max=3.0, step=0.1, round=0.01,
                                   display_mode=io.NumberDisplay.slider),
                    io.Combo.Input("clamp", options=["yes", "no"], default="yes")],
            outputs=[io.Image.Output(display_name="brightened", tooltip="the brighter image")],
        )

    @classmethod
    def execute(cls, image, factor, clamp) -> io.NodeOutput:
        result = image * factor
        return io.NodeOutput(result.clamp(0, 1) if clamp == "yes" else result)


class V3Blank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Blank", category="v3 pack",
                         inputs=[io.Int.Input("size", default=4, min=1, max=64)],
                         outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, size) -> io.NodeOutput:
        return io.NodeOutput(torch.full((1, size, size, 3), 0.4))


class V3Pick(io.ComfyNode):
    """Lazy inputs, validate_inputs, fingerprint_inputs and hidden values, V3's way."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Pick", category="v3 pack", is_output_node=True, hidden=[io.Hidden.unique_id],
            inputs=[io.Boolean.Input("first", default=True),
                    io.Int.Input("a", lazy=True, force_input=True), io.Int.Input("b", lazy=True, force_input=True),
                    io.Int.Input("bound", default=3, min=0, max=5)],
            outputs=[io.Int.Output(), io.String.Output(id="who")],
        )

    @classmethod
    def check_lazy_status(cls, first, a=None, b=None, bound=None):
        return ["a"] if first else ["b"]

    @classmethod
    def validate_inputs(cls, bound):
        return True if bound != 4 else "bound may not be 4"

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, first, a=None, b=None, bound=0) -> io.NodeOutput:
        value = a if first else b
        shown = ui.PreviewText(f"node {cls.hidden.unique_id} picked {value}")
        return io.NodeOutput(value, cls.hidden.unique_id, ui=shown)


class V3Number(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Number", category="v3 pack", inputs=[io.Int.Input("value", default=0)],
                         outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, value) -> io.NodeOutput:
        CALLS.append(value)
        return io.NodeOutput(value)


CALLS = []


class V3Sink(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="V3Sink", category="v3 pack", is_output_node=True,
                         inputs=[io.AnyType.Input("value"), io.AnyType.Input("more", optional=True)])

    @classmethod
    def execute(cls, value, more=None) -> io.NodeOutput:
        return io.NodeOutput()


class V3Extension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [V3Brighten, V3Blank, V3Pick, V3Number, V3Sink]


async def comfy_entrypoint() -> V3Extension:
    return V3Extension()
