"""Text-encoding nodes: prompts to CONDITIONING, with ComfyUI's weighting syntax and embeddings."""

from __future__ import annotations

from graph.node import Float, Int, Node, Output, Socket, String
from graph.types import CLIP, CONDITIONING
from nodes.environment import embedding_file_names
from nodes.tensor_ops import MAX_RESOLUTION


def _clip_or_error(clip, node: str):
    if clip is None:
        raise ValueError(f"{node}: the clip input is empty; connect the CLIP output of a checkpoint loader")
    return clip


def _encode(clip, text):
    with embedding_file_names(clip):
        return clip.encode(text)


def _prompt(name: str = "text") -> String:
    return String(name, default=None, multiline=True, extra={"dynamicPrompts": True},
                  tooltip="The prompt; (word:1.2) weights a word, embedding:name inserts an embedding.")


class CLIPTextEncode(Node):
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    description = "Encodes a prompt with the text encoders, for the sampler's positive or negative input."
    inputs = [_prompt(), Socket("clip", CLIP)]
    outputs = [Output(CONDITIONING, tooltip="The encoded prompt.")]

    def execute(self, text, clip):
        cond, pooled = _encode(_clip_or_error(clip, "CLIPTextEncode"), text)
        return ([(cond, {"pooled_output": pooled})],)


def _size(name: str, default: int = 1024) -> Int:
    return Int(name, default=default, min=0, max=MAX_RESOLUTION, step=None)


class CLIPTextEncodeSDXL(Node):
    category = "advanced/conditioning"
    description = "SDXL prompt encoding with a prompt per encoder and the size and crop conditions."
    inputs = [Socket("clip", CLIP), _size("width"), _size("height"), _size("crop_w", 0), _size("crop_h", 0),
              _size("target_width"), _size("target_height"), _prompt("text_g"), _prompt("text_l")]
    outputs = [Output(CONDITIONING)]

    def execute(self, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
        clip = _clip_or_error(clip, "CLIPTextEncodeSDXL")
        if set(clip.text.encoders) != {"g", "l"}:
            raise ValueError("CLIPTextEncodeSDXL needs an SDXL base checkpoint's CLIP (CLIP-L and bigG)")
        cond, pooled = _encode(clip, {"g": text_g, "l": text_l})
        return ([(cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w,
                         "crop_h": crop_h, "target_width": target_width, "target_height": target_height})],)


class CLIPTextEncodeSDXLRefiner(Node):
    category = "advanced/conditioning"
    description = "SDXL refiner prompt encoding with an aesthetic score (about 6 positive, 2.5 negative)."
    inputs = [Float("ascore", default=6.0, min=0.0, max=1000.0, step=0.01), _size("width"), _size("height"),
              _prompt(), Socket("clip", CLIP)]
    outputs = [Output(CONDITIONING)]

    def execute(self, ascore, width, height, text, clip):
        cond, pooled = _encode(_clip_or_error(clip, "CLIPTextEncodeSDXLRefiner"), text)
        return ([(cond, {"pooled_output": pooled, "aesthetic_score": ascore, "width": width,
                         "height": height})],)


NODE_CLASSES = [CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner]
