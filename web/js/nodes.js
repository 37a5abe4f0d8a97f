/**
 * Node classes for litegraph, one per entry of /object_info: sockets for typed inputs and outputs, widgets for
 * values, a colour per socket type, the "convert to input" and "preview on node" menu entries, and drawing of the
 * run's state on the node (running outline and progress, the error outline, output images and live previews).
 */

import { LGraphNode, LGraphCanvas, LiteGraph } from "@comfyorg/litegraph";
import { declaredInputs, isWidgetSpec, specType } from "./convert.js";
import { addInputWidget, hideWidget } from "./widgets.js";

/** node.properties key: the IMAGE outputs shown on the node after a run (ComfyUI's "preview on node"). */
export const PREVIEW_PROPERTY = "Preview image outputs";

const TYPE_COLOURS = {
  MODEL: "#b39ddb", CLIP: "#ffd500", VAE: "#ff6e6e", CONDITIONING: "#ffa931", LATENT: "#ff9cf9",
  IMAGE: "#64b5f6", MASK: "#81c784", INT: "#9ccc65", FLOAT: "#aed581", STRING: "#80cbc4", BOOLEAN: "#e0e0e0",
  SAMPLER: "#ecb4b4", SIGMAS: "#cdffcd", NOISE: "#b0b0b0", GUIDER: "#66ffff", COMBO: "#80cbc4",
};

/** A stable colour for any type name (the known ones fixed, others hashed to a hue). */
export function typeColour(type) {
  if (TYPE_COLOURS[type]) return TYPE_COLOURS[type];
  let hash = 0;
  for (const ch of String(type)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360}, 60%, 65%)`;
}

function colourSlot(slot) {
  slot.color_on = slot.color_off = typeColour(slot.type);
}

/** Register (or re-register) every node class of objectInfo with LiteGraph. */
export function registerNodes(objectInfo, app) {
  for (const [type, info] of Object.entries(objectInfo)) {
    for (const out of info.output ?? []) LGraphCanvas.link_type_colors[out] = typeColour(out);
    LiteGraph.registerNodeType(type, makeNodeClass(type, info, app));
  }
}

function makeNodeClass(type, info, app) {
  class LoomNode extends LGraphNode {
    static title = info.display_name || type;
    static type = type;
    static category = info.category;
    static description = info.description;
    static info = info;

    constructor(title) {
      super(title ?? LoomNode.title);
      this.serialize_widgets = true;
      this.properties = { "Node name for S&R": type };
      for (const [name, spec] of declaredInputs(info)) {
        if (isWidgetSpec(spec)) {
          addInputWidget(this, name, spec, app);
        } else {
          const slot = this.addInput(name, specType(spec));
          slot.tooltip = spec[1]?.tooltip;
          colourSlot(slot);
        }
      }
      (info.output ?? []).forEach((outType, i) => {
        const slot = this.addOutput(info.output_name?.[i] ?? outType, outType);
        slot.tooltip = info.output_tooltips?.[i];
        colourSlot(slot);
      });
      const [width, height] = this.computeSize();
      this.size = [Math.max(width, 260), height];
    }

    /**
     * Inputs saved with `widget: {name}` (a converted widget): a linked one becomes a socket row and its widget is
     * hidden, as "Convert to input" leaves it; an unlinked one stays on its widget (litegraph shows its socket
     * under the pointer, as ComfyUI's current front end does).
     */
    onConfigure() {
      for (const slot of this.inputs) {
        const widget = slot.widget && this.widgets?.find((w) => w.name === slot.widget.name);
        if (widget && slot.link != null) {
          slot.convertedWidget = widget.name;
          delete slot.widget;
          hideWidget(widget);
        }
      }
      for (const slot of [...this.inputs, ...this.outputs]) colourSlot(slot);
    }

    /** The UI format keeps `widget: {name}` on a converted widget's input (convert.js and ComfyUI read it). */
    onSerialize(data) {
      this.inputs.forEach((slot, i) => {
        if (!slot.convertedWidget || !data.inputs?.[i]) return;
        data.inputs[i].widget = { name: slot.convertedWidget };
        delete data.inputs[i].pos;
      });
    }

    /** Our entries, returned and not pushed: litegraph puts the returned list before its own entries. */
    getExtraMenuOptions() {
      const entries = [];
      for (const widget of this.widgets ?? []) {
        const spec = info.input?.required?.[widget.name] ?? info.input?.optional?.[widget.name];
        if (!spec || !isWidgetSpec(spec)) continue;
        const index = this.inputs.findIndex((s) => s.convertedWidget === widget.name || s.widget?.name === widget.name);
        if (index < 0 || !this.inputs[index].convertedWidget) {
          entries.push({ content: `Convert ${widget.name} to input`, callback: () => app.widgetToInput(this, widget) });
        } else {
          entries.push({ content: `Convert ${widget.name} to widget`, callback: () => app.inputToWidget(this, index) });
        }
      }
      if (!info.output_node && (info.output ?? []).includes("IMAGE")) {
        const on = Boolean(this.properties?.[PREVIEW_PROPERTY]);
        entries.push({ content: on ? "Stop previewing the image on the node" : "Preview the image on the node",
                       callback: () => app.setPreviewOnNode(this, !on) });
      }
      return entries;
    }

    onDrawForeground(ctx) {
      app.drawNodeState(this, ctx);
    }

    /** litegraph appends a pin emoji to a pinned node's title (an empty box without an emoji font): words here. */
    getTitle() {
      const title = super.getTitle();
      return this.flags?.pinned ? `${title} (pinned)` : title;
    }

    drawTitleText(ctx, options) {
      this.drawingTitle = true;
      try {
        super.drawTitleText(ctx, options);
      } finally {
        this.drawingTitle = false;
      }
    }

    get pinned() {
      return !this.drawingTitle && Boolean(this.flags?.pinned);
    }
  }
  return LoomNode;
}
