/**
 * Errors from the server, shown where a person looks: one line per error in the box over the canvas (a click
 * centres its node), and a label over each node that has errors, drawn in screen space after every node (so no
 * neighbour covers it), at a readable size whatever the zoom, wrapped, and kept inside the canvas (below the node
 * when there is no room above it).
 */

import { LiteGraph } from "@comfyorg/litegraph";
import { el } from "./panels.js";

const LABEL_FONT = "13px system-ui, sans-serif";
const LABEL_LINE = 17;
const LABEL_PAD = 6;
const LABEL_WIDTH = 360;
export const LABEL_BACKGROUND = "#4a1616";

/**
 * One message for one error, the input's name said once: ComfyUI's validation errors repeat it
 * ("Value not in list" + "ckpt_name: 'x' not in [...]", or "Value 0 smaller than min of 1: steps"), and the input
 * is shown beside the message anyway.
 */
export function errorMessage(error, input) {
  const strip = (text) => {
    let out = String(text ?? "").trim();
    if (input && out === input) return "";
    if (input) {
      if (out.startsWith(`${input}: `)) out = out.slice(input.length + 2);
      if (out.endsWith(`: ${input}`)) out = out.slice(0, -(input.length + 2));
    }
    return out;
  };
  const message = strip(error.message);
  const details = strip(error.details);
  if (!details || message.includes(details)) return message;
  if (!message || details.includes(message)) return details;
  return `${message}: ${details}`;
}

/** node_errors of a /prompt answer as {node id: [{input, message}]}. */
export function nodeErrorEntries(nodeErrors) {
  const errors = {};
  for (const [id, entry] of Object.entries(nodeErrors ?? {})) {
    errors[id] = (entry.errors ?? []).map((e) => {
      const input = e.extra_info?.input_name ?? null;
      return { input, message: errorMessage(e, input) };
    });
  }
  return errors;
}

/**
 * The error box: the prompt-level error on its own line (its details only when no node error says them, since
 * ComfyUI's details of "Prompt outputs failed validation" are the node errors run together), then one line per
 * node error.
 */
export function renderErrorBox(box, topError, errors, graph, onPick) {
  const items = [];
  const nodeCount = Object.values(errors).reduce((n, list) => n + list.length, 0);
  if (topError) {
    const text = nodeCount || !topError.details ? topError.message : `${topError.message}: ${topError.details}`;
    items.push(el("div", { className: "error-top", textContent: text }));
  }
  for (const [id, list] of Object.entries(errors)) {
    const node = graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
    for (const error of list) {
      const where = `#${id} ${node?.title ?? ""}${error.input ? ` › ${error.input}` : ""}`;
      items.push(el("div", { className: "error-node", dataset: { node: id, input: error.input ?? "" },
                             onclick: () => node && onPick(node) },
                    el("span", { className: "error-where", textContent: where }),
                    el("span", { className: "error-message", textContent: error.message })));
    }
  }
  box.replaceChildren(...items);
  box.hidden = items.length === 0;
}

function wrap(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const candidate = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(candidate).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = candidate;
    }
  }
  if (line) lines.push(line);
  return lines;
}

/**
 * Draw the error labels in screen space (the canvas' overlay pass, after every node) and return where each went:
 * [{node, x, y, width, height, lines}] in canvas pixels.
 */
export function drawErrorLabels(ctx, canvas, graph, errors) {
  const placed = [];
  const width = canvas.canvas.width / (window.devicePixelRatio || 1);
  const height = canvas.canvas.height / (window.devicePixelRatio || 1);
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  ctx.save();
  ctx.font = LABEL_FONT;
  ctx.textBaseline = "top";
  for (const [id, list] of Object.entries(errors)) {
    const node = graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
    if (!node || !list.length) continue;
    const [left, top] = canvas.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
    const [right, bottom] = canvas.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
    if (right < 0 || left > width || bottom < 0 || top > height) continue;
    const textWidth = Math.min(LABEL_WIDTH, width - 2 * LABEL_PAD - 4);
    const lines = list.flatMap((e) => wrap(ctx, `${e.input ? `${e.input}: ` : ""}${e.message}`, textWidth));
    const boxWidth = Math.min(textWidth, Math.max(...lines.map((l) => ctx.measureText(l).width))) + 2 * LABEL_PAD;
    const boxHeight = lines.length * LABEL_LINE + 2 * LABEL_PAD;
    let y = top - boxHeight - 4;
    if (y < 2) y = bottom + 4; // no room above the node: below it
    if (y + boxHeight > height - 2) y = Math.max(2, height - 2 - boxHeight);
    const x = Math.max(2, Math.min(left, width - 2 - boxWidth));
    ctx.fillStyle = LABEL_BACKGROUND;
    ctx.strokeStyle = "#ff6060";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.roundRect(x, y, boxWidth, boxHeight, 4);
    ctx.fill();
    ctx.stroke();
    ctx.fillStyle = "#ffd0d0";
    lines.forEach((line, i) => ctx.fillText(line, x + LABEL_PAD, y + LABEL_PAD + i * LABEL_LINE));
    placed.push({ node: String(id), x, y, width: boxWidth, height: boxHeight, lines });
  }
  ctx.restore();
  return placed;
}
