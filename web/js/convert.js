/**
 * UI format (litegraph 0.4, as ComfyUI saves it) → API format (what POST /prompt takes).
 *
 * The same rules as the server's graph/ui_format.py, so a workflow queued from the canvas and the same file run
 * from the CLI are one prompt (tests/web/test_convert_agreement.py runs both on every shipped workflow):
 * - widgets_values are positional, in the node's declared input order (required, then optional); a widget with
 *   `control_after_generate` or `image_upload` is followed by one UI-only value, skipped when present;
 * - muted nodes (mode 2) are dropped; a bypassed node (mode 4) passes each output through from its first input of a
 *   compatible type, the same slot first;
 * - Reroute nodes are followed to their source, a PrimitiveNode's value becomes a literal, Notes are ignored.
 * Pure functions over plain objects: no DOM, no litegraph, so node can run this module directly.
 */

export const MUTED = 2;
export const BYPASSED = 4;
export const FRONTEND_ONLY = new Set(["Reroute", "PrimitiveNode", "Note", "MarkdownNote"]);
export const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

const members = (type) => new Set(String(type).split(",").map((s) => s.trim()).filter(Boolean));

/** True if a value of type `received` may feed an input of type `expected` (graph/types.py). */
export function typesCompatible(received, expected) {
  received = String(received);
  expected = String(expected);
  if (received === expected || received === "*" || expected === "*") return true;
  const got = members(received);
  const want = members(expected);
  if (got.has("*") || want.has("*") || [...got].some((t) => want.has(t))) return true;
  return want.has("COMBO") && (got.has("STRING") || got.has("COMBO"));
}

export function isUiWorkflow(data) {
  return data !== null && typeof data === "object" && Array.isArray(data.nodes) && "links" in data;
}

/** API format: an object of nodes, each with a class_type. */
export function isApiWorkflow(data) {
  if (data === null || typeof data !== "object" || Array.isArray(data) || isUiWorkflow(data)) return false;
  const nodes = Object.values(data);
  return nodes.length > 0 && nodes.every((n) => n && typeof n === "object" && typeof n.class_type === "string");
}

/** [name, spec] of every declared input, in declared order: required first, then optional. */
export function declaredInputs(info) {
  const out = [];
  for (const group of ["required", "optional"]) {
    const specs = info?.input?.[group] ?? {};
    const order = info?.input_order?.[group] ?? Object.keys(specs);
    for (const name of order) if (specs[name]) out.push([name, specs[name]]);
  }
  return out;
}

/** The socket type of an input spec: a list of options is a COMBO. */
export function specType(spec) {
  return Array.isArray(spec[0]) ? "COMBO" : String(spec[0]);
}

/** True when the canvas shows this input as a widget (and widgets_values stores its value). */
export function isWidgetSpec(spec) {
  return WIDGET_TYPES.has(specType(spec)) && !spec[1]?.forceInput;
}

/** Whether a widget is followed by a UI-only value in widgets_values. */
export function hasExtraValue(spec) {
  return Boolean(spec[1]?.control_after_generate || spec[1]?.image_upload);
}

function linksTable(workflow) {
  const table = new Map();
  for (const link of workflow.links ?? []) {
    let entry;
    if (Array.isArray(link) && link.length >= 5) {
      entry = [link[1], link[2], link[3], link[4], link.length > 5 ? link[5] : "*"];
      table.set(link[0], entry);
    } else if (link && typeof link === "object") {
      entry = [link.origin_id, link.origin_slot, link.target_id, link.target_slot, link.type ?? "*"];
      table.set(link.id, entry);
    } else {
      throw new Error(`malformed link entry ${JSON.stringify(link)}`);
    }
    entry[0] = String(entry[0]);
    entry[1] = Number(entry[1]);
    entry[2] = String(entry[2]);
    entry[3] = Number(entry[3]);
    entry[4] = String(entry[4]);
  }
  return table;
}

const wrapList = (value) => (Array.isArray(value) ? { __value__: value } : value);

class Converter {
  constructor(workflow, objectInfo) {
    this.objectInfo = objectInfo;
    this.nodes = new Map();
    for (const node of workflow.nodes) {
      if (!node || typeof node !== "object" || !("id" in node) || typeof node.type !== "string") {
        throw new Error(`malformed node entry ${JSON.stringify(node).slice(0, 80)}`);
      }
      this.nodes.set(String(node.id), node);
    }
    this.links = linksTable(workflow);
  }

  inputLink(node, index) {
    const inputs = node.inputs ?? [];
    return index < inputs.length ? inputs[index].link : null;
  }

  /** What really feeds a link: ["link", [id, slot]], ["literal", value] or null. */
  resolve(linkId, depth = 0) {
    if (linkId === null || linkId === undefined || !this.links.has(linkId) || depth > 64) return null;
    const [origin, slot, , , linkType] = this.links.get(linkId);
    const node = this.nodes.get(origin);
    if (!node || node.mode === MUTED) return null;
    if (node.type === "Reroute") return this.resolve(this.inputLink(node, 0), depth + 1);
    if (node.type === "PrimitiveNode") {
      const values = node.widgets_values ?? [];
      return values.length ? ["literal", values[0]] : null;
    }
    if (node.mode === BYPASSED) {
      const inputs = node.inputs ?? [];
      const outputs = node.outputs ?? [];
      const outType = slot < outputs.length ? (outputs[slot].type ?? linkType) : linkType;
      const order = (slot < inputs.length ? [slot] : []).concat([...inputs.keys()].filter((i) => i !== slot));
      for (const i of order) {
        if (typesCompatible(inputs[i].type ?? "*", outType)) return this.resolve(inputs[i].link, depth + 1);
      }
      return null;
    }
    return ["link", [origin, slot]];
  }

  widgetInputs(node) {
    const info = this.objectInfo[node.type];
    const values = node.widgets_values;
    if (!info || values === null || values === undefined) return {};
    const widgets = declaredInputs(info).filter(([, spec]) => isWidgetSpec(spec));
    const named = {};
    if (!Array.isArray(values)) {
      for (const [name] of widgets) if (name in values) named[name] = values[name];
      return named;
    }
    const extras = widgets.filter(([, spec]) => hasExtraValue(spec)).length;
    const skipExtras = values.length >= widgets.length + extras;
    let position = 0;
    for (const [name, spec] of widgets) {
      if (position >= values.length) break;
      named[name] = values[position];
      position += 1;
      if (skipExtras && hasExtraValue(spec)) position += 1;
    }
    return named;
  }

  convert() {
    const api = {};
    for (const [id, node] of this.nodes) {
      if (FRONTEND_ONLY.has(node.type) || node.mode === MUTED || node.mode === BYPASSED) continue;
      const inputs = {};
      for (const [name, value] of Object.entries(this.widgetInputs(node))) inputs[name] = wrapList(value);
      for (const slot of node.inputs ?? []) {
        const resolved = this.resolve(slot.link);
        if (!slot.name) continue;
        if (resolved === null) {
          // a dead link leaves the input missing, as on the canvas
          if ((slot.link !== null && slot.link !== undefined) || !slot.widget) delete inputs[slot.name];
          continue;
        }
        const [kind, value] = resolved;
        inputs[slot.name] = kind === "literal" ? wrapList(value) : value;
      }
      const info = this.objectInfo[node.type];
      const title = node.title || (info ? info.display_name || info.name || node.type : node.type);
      api[id] = { class_type: node.type, inputs, _meta: { title } };
    }
    return api;
  }
}

/** Convert a UI-format workflow to the API format (a new object; the input is not modified). */
export function uiToApi(workflow, objectInfo) {
  if (!workflow || typeof workflow !== "object" || !Array.isArray(workflow.nodes)) {
    throw new Error("not a UI-format workflow: no 'nodes' list");
  }
  return new Converter(workflow, objectInfo).convert();
}
