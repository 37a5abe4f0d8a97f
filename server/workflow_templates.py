"""Our shipped workflows (`workflows/*.json`) as the template browser of ComfyUI's front end reads templates.

ComfyUI serves `/templates/index.json` (a list of categories `{moduleName, category, title, icon, type, templates:
[{name, title, description, mediaType, mediaSubtype}]}`), each template's workflow at `/templates/<name>.json` and
a thumbnail at `/templates/<name>-1.<mediaSubtype>`. Our canvas opens the same `/templates/<name>.json` files. We
ship no pictures, so the thumbnail is drawn from the workflow itself: its nodes where the workflow places them, titled,
with their links; drawn once per file version (a bounded cache keyed by path and modification time).
"""

from __future__ import annotations

import io
import json
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

MODULE = "default"  # the front end fetches templates of this module from /templates/ (others: /workflow_templates)
# The template browser's navigation lists a category under its `category` group (ComfyUI's own: "GENERATION TYPE")
CATEGORY_GROUP, CATEGORY_TITLE, CATEGORY_ICON = "Latent Loom", "Shipped workflows", "icon-[lucide--image]"
THUMBNAIL_SIZE = (512, 384)
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TITLE_HEIGHT = 30  # litegraph draws a node's title bar above its `pos`, this tall
SLOT_HEIGHT = 20
BACKGROUND, NODE_BODY, NODE_TITLE, LINK, TEXT = "#202020", "#353535", "#2a2a2a", "#8a9bb0", "#dddddd"


def shipped(folder: Path) -> dict[str, Path]:
    """The shipped workflows by template name (the file name without `.json`), only names safe in a URL."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.glob("*.json"), key=lambda p: p.stem)
            if path.is_file() and TEMPLATE_NAME.fullmatch(path.stem)}


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("shipped workflow %s is unreadable: %s", path.name, exc)
        return {}
    return value if isinstance(value, dict) else {}


def title_of(name: str) -> str:
    """`txt2img-sdxl` → `Txt2img sdxl`: what the browser shows under the thumbnail."""
    text = name.replace("-", " ").replace("_", " ")
    return text[:1].upper() + text[1:]


def index(folder: Path) -> list[dict[str, Any]]:
    """The template browser's index: one category holding every shipped workflow, its description from the
    workflow's own `extra.description`."""
    templates = []
    for name, path in shipped(folder).items():
        extra = _read(path).get("extra")
        description = extra.get("description") if isinstance(extra, dict) else None
        templates.append({"name": name, "title": title_of(name),
                          "description": description if isinstance(description, str) else "",
                          "mediaType": "image", "mediaSubtype": "webp"})
    return [{"moduleName": MODULE, "category": CATEGORY_GROUP, "title": CATEGORY_TITLE, "icon": CATEGORY_ICON,
             "type": "image", "templates": templates}]


# thumbnails ----------------------------------------------------------------------------------------------
def _box(node: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """(left, top, right, bottom) of a node with its title bar, or None for a node without a usable place."""
    pos, size = node.get("pos"), node.get("size")
    if isinstance(pos, dict):  # litegraph also writes {"0": x, "1": y}
        pos = [pos.get("0"), pos.get("1")]
    if isinstance(size, dict):
        size = [size.get("0"), size.get("1")]
    try:
        x, y = float(pos[0]), float(pos[1])
        w, h = float(size[0]), float(size[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    if not all(abs(v) < 1e7 for v in (x, y, w, h)) or w <= 0 or h < 0:
        return None
    return x, y - TITLE_HEIGHT, x + w, y + h


def draw_thumbnail(workflow: dict[str, Any], size: tuple[int, int] = THUMBNAIL_SIZE) -> Image.Image:
    """The workflow's graph drawn to fit `size`: node boxes where the workflow places them, each titled, and
    its links from output slot to input slot."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    raw_nodes = workflow.get("nodes")
    boxes = {node.get("id"): box for node in (raw_nodes if isinstance(raw_nodes, list) else [])
             if isinstance(node, dict) and (box := _box(node)) is not None}
    if not boxes:
        return image
    left, top = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    right, bottom = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    margin = 16
    scale = min((size[0] - 2 * margin) / max(right - left, 1.0), (size[1] - 2 * margin) / max(bottom - top, 1.0))
    offset_x = (size[0] - (right - left) * scale) / 2
    offset_y = (size[1] - (bottom - top) * scale) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return offset_x + (x - left) * scale, offset_y + (y - top) * scale

    for link in workflow.get("links") or []:
        if not (isinstance(link, list) and len(link) >= 5 and link[1] in boxes and link[3] in boxes):
            continue
        source, target = boxes[link[1]], boxes[link[3]]
        slots = [s if isinstance(s, int) and 0 <= s < 64 else 0 for s in (link[2], link[4])]
        start = at(source[2], source[1] + TITLE_HEIGHT + (slots[0] + 0.5) * SLOT_HEIGHT)
        end = at(target[0], target[1] + TITLE_HEIGHT + (slots[1] + 0.5) * SLOT_HEIGHT)
        bend = max(abs(end[0] - start[0]) / 2, 8.0)
        points = [_bezier(start, (start[0] + bend, start[1]), (end[0] - bend, end[1]), end, i / 16)
                  for i in range(17)]
        draw.line(points, fill=LINK, width=2)
    font = _font(max(8, min(16, round(18 * scale))))
    titles = {node.get("id"): str(node.get("title") or node.get("type") or "") for node in raw_nodes
              if isinstance(node, dict)}
    for node_id, box in boxes.items():
        x0, y0 = at(box[0], box[1])
        x1, y1 = at(box[2], box[3])
        title_bottom = min(y1, y0 + TITLE_HEIGHT * scale)
        draw.rectangle((x0, y0, x1, y1), fill=NODE_BODY, outline="#000000")
        draw.rectangle((x0, y0, x1, title_bottom), fill=NODE_TITLE)
        title = titles.get(node_id, "")
        while title and draw.textlength(title, font=font) > x1 - x0 - 6:
            title = title[:-2] + "…" if len(title) > 2 else ""
        if title:
            draw.text((x0 + 4, (y0 + title_bottom) / 2), title, fill=TEXT, font=font, anchor="lm")
    return image


def _bezier(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], p3: tuple[float, float],
            t: float) -> tuple[float, float]:
    u = 1 - t
    return (u ** 3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t ** 3 * p3[0],
            u ** 3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t ** 3 * p3[1])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=32)
def _thumbnail_webp(path: str, modified_ns: int) -> bytes:
    buffer = io.BytesIO()
    draw_thumbnail(_read(Path(path))).save(buffer, format="WEBP", quality=85)
    return buffer.getvalue()


def thumbnail(path: Path) -> bytes:
    """The WebP thumbnail of a shipped workflow, drawn again only when the file changes."""
    return _thumbnail_webp(str(path), path.stat().st_mtime_ns)
