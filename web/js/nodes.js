/**
 * Node classes for litegraph, one per entry of /object_info: sockets for typed inputs and outputs, widgets for
 * values, a colour per socket type, the "convert to input" menu, and drawing of the run's state on the node
 * (running outline and progress, the error outline, output images and live previews).
 */

import { LGraphNode, LGraphCanvas, LiteGraph } from "@comfyorg/litegraph";
import { declaredInputs, isWidgetSpec, specType } from "./convert.js";
import { addInputWidget } from "./widgets.js";

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

    onConfigure() {
      for (const slot of [...this.inputs, ...this.outputs]) colourSlot(slot);
    }

    getExtraMenuOptions(_canvas, options) {
      for (const widget of this.widgets ?? []) {
        const spec = info.input?.required?.[widget.name] ?? info.input?.optional?.[widget.name];
        if (!spec || !isWidgetSpec(spec)) continue;
        const index = this.inputs.findIndex((s) => s.widget?.name === widget.name);
        if (index < 0) {
          options.push({ content: `Convert ${widget.name} to input`, callback: () => app.widgetToInput(this, widget) });
        } else {
          options.push({ content: `Convert ${widget.name} to widget`, callback: () => app.inputToWidget(this, index) });
        }
      }
      return options;
    }

    onDrawForeground(ctx) {
      app.drawNodeState(this, ctx);
    }
  }
  return LoomNode;
}
