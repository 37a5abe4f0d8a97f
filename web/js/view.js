/**
 * Small pieces of how the canvas looks: images on a node (a batch as a grid), the type of the socket under the
 * pointer, and litegraph's menus in plain text.
 */

const GRID_MAX_HEIGHT = 256;
const GRID_GAP = 4;

/**
 * Where each image of a batch goes under a node: a grid of ceil(sqrt(n)) columns filling the node's width, each
 * cell as large as the biggest image fits; returns [{x, y, width, height}] in node coordinates.
 */
export function imageGridRects(images, width, top) {
  const count = images.length;
  const columns = Math.ceil(Math.sqrt(count));
  const rows = Math.ceil(count / columns);
  const cellWidth = (width - GRID_GAP * (columns - 1)) / columns;
  const cellHeight = Math.min(cellWidth, (GRID_MAX_HEIGHT - GRID_GAP * (rows - 1)) / rows);
  return images.map((image, i) => {
    const scale = Math.min(cellWidth / image.width, cellHeight / image.height);
    const [w, h] = [image.width * scale, image.height * scale];
    const column = i % columns;
    const row = Math.floor(i / columns);
    return { x: column * (cellWidth + GRID_GAP) + (cellWidth - w) / 2, y: top + row * (cellHeight + GRID_GAP) + (cellHeight - h) / 2,
             width: w, height: h };
  });
}

/** Draw a node's images (one, or a batch as a grid) below it. */
export function drawImageGrid(ctx, images, width, top) {
  const ready = images.filter((image) => image.width > 0 && image.height > 0);
  imageGridRects(ready, width, top).forEach((rect, i) => {
    ctx.drawImage(ready[i], rect.x, rect.y, rect.width, rect.height);
  });
}

const PICTOGRAPHS = /[\p{Extended_Pictographic}\u{FE0F}\u{1F195}]/gu;

/** Menu entries in plain text: litegraph marks "Convert to Subgraph" with an emoji; ours say "(new)". */
export function plainMenu(options) {
  for (const option of options ?? []) {
    if (option && typeof option.content === "string" && PICTOGRAPHS.test(option.content)) {
      option.content = option.content.replace(/\s*\u{1F195}/u, " (new)").replace(PICTOGRAPHS, "").trim();
    }
    PICTOGRAPHS.lastIndex = 0;
  }
  return options;
}

/** The name, type and description of the socket under the pointer, in a box beside it. */
export class SlotTooltip {
  constructor(app, box) {
    this.app = app;
    this.box = box;
    app.canvasElement.addEventListener("pointermove", (event) => this.update(event));
    app.canvasElement.addEventListener("pointerleave", () => this.hide());
  }

  /** {node, input|output, index} of the socket at a graph point, or null. */
  slotAt([x, y]) {
    const node = this.app.nodeAt([x, y]);
    if (!node || node.flags?.collapsed) return null;
    const found = node.getSlotInPosition(x, y);
    if (!found) return null;
    return { node, slot: found.input ?? found.output, isInput: Boolean(found.input), index: found.slot };
  }

  update(event) {
    if (event.buttons) return this.hide();
    const hit = this.slotAt(this.app.canvas.convertEventToCanvasOffset(event));
    if (!hit) return this.hide();
    const { slot, isInput } = hit;
    const type = Array.isArray(slot.type) ? "COMBO" : String(slot.type || "*");
    const label = slot.label || slot.localized_name || slot.name || "";
    this.box.replaceChildren();
    const head = document.createElement("div");
    head.className = "slot-tooltip-head";
    head.append(`${isInput ? "input" : "output"} ${label}: `);
    const typeSpan = document.createElement("b");
    typeSpan.className = "slot-tooltip-type";
    typeSpan.textContent = type;
    head.append(typeSpan);
    this.box.append(head);
    if (slot.tooltip) {
      const text = document.createElement("div");
      text.textContent = slot.tooltip;
      this.box.append(text);
    }
    const area = this.app.canvasElement.parentElement.getBoundingClientRect();
    this.box.hidden = false;
    const left = Math.min(event.clientX - area.left + 14, area.width - this.box.offsetWidth - 4);
    const top = Math.min(event.clientY - area.top + 14, area.height - this.box.offsetHeight - 4);
    Object.assign(this.box.style, { left: `${Math.max(0, left)}px`, top: `${Math.max(0, top)}px` });
    this.box.dataset.type = type;
  }

  hide() {
    this.box.hidden = true;
  }
}

/** An image element once loaded (rejects, naming the URL, when it cannot be). */
export function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`could not load ${url}`));
    image.src = url;
  });
}

const VIDEO_EXTENSIONS = /\.(mp4|webm|mkv|mov|m4v)$/i;

/** Whether a stored file (a ui entry's or an upload's file name) is a video: it is shown playing, not as a still. */
export function isVideoName(name) {
  return VIDEO_EXTENSIONS.test(String(name ?? ""));
}

/**
 * A muted, looping <video> once its first frame is ready, sized like an image (width/height = the video's) so that
 * drawImageGrid draws its current frame; `onFrame` is called as it plays, so the canvas can redraw the node.
 */
export function loadVideo(url, onFrame = () => {}) {
  return new Promise((resolve, reject) => {
    const video = document.createElement("video");
    Object.assign(video, { muted: true, loop: true, autoplay: true, playsInline: true, preload: "auto" });
    video.addEventListener("loadeddata", () => {
      video.width = video.videoWidth;
      video.height = video.videoHeight;
      video.play().catch(() => {}); // autoplay refused: the first frame still shows
      resolve(video);
    }, { once: true });
    video.addEventListener("timeupdate", () => onFrame(video));
    video.onerror = () => reject(new Error(`could not load ${url}`));
    video.src = url;
  });
}

/** An image or, for a video file name, a playing video (see loadVideo). */
export function loadMedia(url, name, onFrame) {
  return isVideoName(name) ? loadVideo(url, onFrame) : loadImage(url);
}
