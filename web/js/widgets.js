/**
 * Widgets for the declared input kinds: INT/FLOAT (min, max, step), STRING (multiline or one line), BOOLEAN,
 * COMBO; the control widget after a seed (fixed, increment, decrement, randomize) and the upload button after an
 * image_upload combo. Their order is the declared input order, the extra widget right after its input, which is
 * exactly the positional layout of widgets_values that convert.js and the server read.
 */

import { specType } from "./convert.js";

export const SEED_CONTROLS = ["fixed", "increment", "decrement", "randomize"];
const MULTILINE_LINES = 4;

function decimals(step) {
  const text = String(step ?? 1);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

function numberWidget(node, name, kind, config) {
  const step = config.step ?? (kind === "INT" ? 1 : 0.01);
  const precision = kind === "INT" ? 0 : Math.max(decimals(config.round ?? step), decimals(step));
  const options = { min: config.min, max: config.max, step: step * 10, step2: step, precision };
  // no declared default: 0 brought within the range (as convert.js fills a missing value)
  const start = config.default ?? Math.min(Math.max(0, config.min ?? -Infinity), config.max ?? Infinity);
  const widget = node.addWidget("number", name, start, (value) => {
    let v = Number(value);
    if (kind === "INT") v = Math.round(v);
    else v = Number(v.toFixed(precision));
    widget.value = v;
  }, options);
  return widget;
}

/** A multiline text box drawn on the node; a click opens a textarea over it to edit. */
function multilineWidget(node, name, config, app) {
  const H = 20;
  const widget = {
    type: "multiline",
    name,
    value: config.default ?? "",
    options: { multiline: true },
    computeSize: (width) => [width, H * MULTILINE_LINES + 8],
    draw(ctx, _node, width, y) {
      const height = H * MULTILINE_LINES + 4;
      ctx.save();
      ctx.fillStyle = "#1b1b1b";
      ctx.strokeStyle = "#555";
      ctx.beginPath();
      ctx.roundRect(12, y, width - 24, height, 6);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = this.value ? "#ddd" : "#777";
      ctx.font = "12px sans-serif";
      const lines = wrapText(ctx, this.value || name, width - 36).slice(0, MULTILINE_LINES);
      lines.forEach((line, i) => ctx.fillText(line, 18, y + 15 + i * 16));
      ctx.restore();
    },
    mouse(event, _pos, target) {
      // open on release: the canvas takes the focus back while it handles the press
      if (event.type === "pointerup" || event.type === "mouseup") setTimeout(() => app.editText(target, this), 0);
      return true;
    },
  };
  node.addCustomWidget(widget);
  return widget;
}

function wrapText(ctx, text, width) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ")) {
      const candidate = line ? `${line} ${word}` : word;
      if (ctx.measureText(candidate).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** Add the widget(s) of one declared input; returns the value widget. */
export function addInputWidget(node, name, spec, app) {
  const kind = specType(spec);
  const config = spec[1] ?? {};
  let widget;
  if (kind === "INT" || kind === "FLOAT") {
    widget = numberWidget(node, name, kind, config);
  } else if (kind === "STRING") {
    widget = config.multiline
      ? multilineWidget(node, name, config, app)
      : node.addWidget("text", name, config.default ?? "", () => {}, {});
  } else if (kind === "BOOLEAN") {
    widget = node.addWidget("toggle", name, Boolean(config.default), () => {},
                            { on: config.label_on ?? "true", off: config.label_off ?? "false" });
  } else {
    const values = Array.isArray(spec[0]) ? spec[0] : (config.options ?? []);
    const value = config.default ?? values[0] ?? "";
    widget = node.addWidget("combo", name, value, () => {}, { values: [...values] });
  }
  widget.tooltip = config.tooltip;
  widget.inputType = kind;
  if (config.control_after_generate) {
    const control = node.addWidget("combo", "control_after_generate", "randomize", () => {},
                                   { values: SEED_CONTROLS });
    control.controls = widget;
    widget.control = control;
  }
  if (config.image_upload || config.video_upload) {
    const button = node.addWidget("button", "choose file to upload", "image", () => app.chooseUpload(node, widget));
  }
  return widget;
}

/** Apply a seed widget's control after a queued run, as ComfyUI does ("control after generate"). */
export function applySeedControl(widget) {
  const mode = widget.control?.value;
  const { min = 0, max = Number.MAX_SAFE_INTEGER, step2 = 1 } = widget.options;
  const top = Math.min(max, Number.MAX_SAFE_INTEGER);
  if (mode === "increment") widget.value = Math.min(top, widget.value + step2);
  else if (mode === "decrement") widget.value = Math.max(min, widget.value - step2);
  else if (mode === "randomize") widget.value = min + Math.floor(Math.random() * Math.min(top - min + 1, 2 ** 50));
}

/**
 * A widget converted to an input: hidden and taking no room (its companion control widget too), its value still
 * in widgets_values at its place. The input is an ordinary socket row, always drawn; litegraph would otherwise lay
 * an input that names a widget over that widget and draw it only under the pointer. The `widget: {name}` that the
 * UI format keeps on such an input is written back when the node is serialised (nodes.js).
 */
export function hideWidget(widget) {
  for (const w of [widget, widget.control].filter(Boolean)) {
    if (w.hidden) continue;
    w.hidden = true;
    w.shownComputeSize = Object.getOwnPropertyDescriptor(w, "computeSize") ?? null;
    w.computeSize = () => [0, -4];
  }
}

/** Show a widget hidden by hideWidget again. */
export function showWidget(widget) {
  for (const w of [widget, widget.control].filter(Boolean)) {
    if (!w.hidden) continue;
    w.hidden = false;
    if (w.shownComputeSize) Object.defineProperty(w, "computeSize", w.shownComputeSize);
    else delete w.computeSize;
    delete w.shownComputeSize;
  }
}
