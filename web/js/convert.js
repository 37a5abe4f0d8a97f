/**
 * UI format (litegraph 0.4, as ComfyUI saves it) → API format (what POST /prompt takes).
 *
 * The same rules as the server's graph/ui_format.py, so a workflow queued from the canvas and the same file run
 * from the CLI are one prompt (tests/web/test_convert_agreement.py runs both on every shipped workflow):
 * - widgets_values are positional, in the node's declared input order (required, then optional); a seed-like
 *   widget (`control_after_generate`, or an INT named seed / noise_seed) may be followed by its control mode, skipped
 *   where it is there and not assumed where it is not; an `image_upload` widget is followed by the button's value
 *   when the list is long enough to hold it;
 * - a widget with no saved value (missing or short widgets_values, a {name: value} dict without it) gets its
 *   declared default, else a combo's first option;
 * - subgraphs (definitions.subgraphs) are expanded first, inner nodes named "12:5" (see expandSubgraphs);
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

export const CONTROL_VALUES = new Set(["fixed", "increment", "decrement", "randomize"]);
const SEED_NAMES = new Set(["seed", "noise_seed"]);

/** Whether the front end gives this widget a control_after_generate companion value. */
export function hasControlValue(name, spec) {
  return Boolean(spec[1]?.control_after_generate) || (specType(spec) === "INT" && SEED_NAMES.has(name));
}

/** What a widget whose input declares no default starts at (as graph/ui_format.py's EMPTY_WIDGET_VALUES). */
const EMPTY_WIDGET_VALUES = { STRING: "", BOOLEAN: false, INT: 0, FLOAT: 0 };

/**
 * The value a widget without a saved value gets: its default, else a combo's first option, else its type's
 * empty value (0 brought within the input's range); undefined for a combo without options.
 */
export function widgetDefault(spec) {
  if (spec[1] && spec[1].default !== undefined && spec[1].default !== null) return spec[1].default;
  const type = specType(spec);
  const options = Array.isArray(spec[0]) ? spec[0] : type === "COMBO" ? spec[1]?.options : undefined;
  if (Array.isArray(spec[0]) || type === "COMBO") return Array.isArray(options) && options.length ? options[0] : undefined;
  let value = EMPTY_WIDGET_VALUES[type];
  if (typeof value === "number") {
    if (typeof spec[1]?.min === "number") value = Math.max(value, spec[1].min);
    if (typeof spec[1]?.max === "number") value = Math.min(value, spec[1].max);
  }
  return value;
}

/** Whether values[position] is the UI-only value after a widget (a control mode, an upload button's value). */
function companionFollows(name, spec, values, position, widgetsLeft) {
  if (position >= values.length) return false;
  if (hasControlValue(name, spec)) return typeof values[position] === "string" && CONTROL_VALUES.has(values[position]);
  const upload = spec[1]?.image_upload || spec[1]?.video_upload; // ComfyUI's front end adds the same button to both
  return Boolean(upload) && values.length - position > widgetsLeft;
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
    if (!info) return {};
    const widgets = declaredInputs(info).filter(([, spec]) => isWidgetSpec(spec));
    const values = node.widgets_values;
    const named = {};
    if (Array.isArray(values)) {
      let position = 0;
      for (const [index, [name, spec]] of widgets.entries()) {
        if (position >= values.length) break;
        named[name] = values[position];
        position += 1;
        if (companionFollows(name, spec, values, position, widgets.length - index - 1)) position += 1;
      }
    } else if (values && typeof values === "object") {
      for (const [name] of widgets) if (name in values) named[name] = values[name];
    }
    for (const [name, spec] of widgets) {
      if (!(name in named)) {
        const value = widgetDefault(spec);
        if (value !== undefined) named[name] = value;
      }
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
  return new Converter(expandSubgraphs(workflow), objectInfo).convert();
}

/* Subgraphs (graph/subgraphs.py has the schema assumed and the rules): every instance (a node whose type is the id
 * of a definition in definitions.subgraphs) is replaced by its inner nodes, named "<instance>:<inner>"; its
 * boundary becomes a Reroute per input and output, or a PrimitiveNode for a value the instance stores. */
const INPUT_NODE = "-10";
const OUTPUT_NODE = "-20";
const MAX_SUBGRAPH_DEPTH = 16;

function linkFields(link) {
  if (Array.isArray(link) && link.length >= 5) {
    return [link[0], String(link[1]), Number(link[2]), String(link[3]), Number(link[4]),
      String(link.length > 5 ? link[5] : "*")];
  }
  if (link && typeof link === "object") {
    return [link.id, String(link.origin_id), Number(link.origin_slot ?? 0), String(link.target_id),
      Number(link.target_slot ?? 0), String(link.type ?? "*")];
  }
  throw new Error(`malformed link entry ${JSON.stringify(link)}`);
}

/** Every subgraph definition in a workflow, by id (nested definitions included). */
export function subgraphDefinitions(workflow) {
  const found = new Map();
  const pending = [workflow];
  while (pending.length) {
    const holder = pending.pop();
    for (const sub of holder?.definitions?.subgraphs ?? []) {
      if (!sub || typeof sub.id !== "string" || !Array.isArray(sub.nodes)) {
        throw new Error(`malformed subgraph definition ${JSON.stringify(sub).slice(0, 80)}`);
      }
      if (!found.has(sub.id)) {
        found.set(sub.id, sub);
        pending.push(sub);
      }
    }
  }
  return found;
}

class Expander {
  constructor(definitions) {
    this.definitions = definitions;
    this.nextLink = 1;
    this.nodes = [];
    this.links = [];
    this.inputReroutes = new Set();
  }

  newLink(origin, originSlot, target, targetSlot, kind) {
    const id = this.nextLink++;
    this.links.push([id, origin, originSlot, target, targetSlot, kind]);
    return id;
  }

  addBoundary(id, type, value) {
    const node = { id, type, mode: 0, inputs: [], outputs: [] };
    if (type === "Reroute") node.inputs = [{ name: "", type: "*", link: null }];
    else node.widgets_values = [value];
    this.nodes.push(node);
    return node;
  }

  inputIndex(instance, name) {
    return (this.definitions.get(instance.type).inputs ?? []).findIndex((slot) => slot.name === name);
  }

  expand(nodes, links, prefix, stack, boundaryIn = new Map(), boundaryOut = new Map()) {
    const plain = new Map();
    const instances = new Map();
    for (const node of nodes) {
      if (!node || typeof node !== "object" || !("id" in node) || typeof node.type !== "string") {
        throw new Error(`malformed node entry ${JSON.stringify(node).slice(0, 80)}`);
      }
      const local = String(node.id);
      const flatId = `${prefix}${node.id}`;
      const definition = this.definitions.get(node.type);
      if (definition && node.mode !== MUTED && node.mode !== BYPASSED) {
        instances.set(local, this.instance(node, flatId, definition, stack));
        continue;
      }
      const copy = { ...node, id: flatId, inputs: (node.inputs ?? []).map((slot) => ({ ...slot, link: null })) };
      plain.set(local, copy);
      this.nodes.push(copy);
    }
    for (const link of links ?? []) {
      const [, origin, originSlot, target, targetSlot, kind] = linkFields(link);
      let feeder;
      if (origin === INPUT_NODE) feeder = boundaryIn.get(originSlot);
      else if (instances.has(origin)) feeder = instances.get(origin)[2].get(originSlot);
      else feeder = plain.get(origin);
      if (!feeder) continue;
      const source = [feeder.id, plain.has(origin) ? originSlot : 0];
      let receiver;
      let slot = 0;
      if (target === OUTPUT_NODE) {
        receiver = boundaryOut.get(targetSlot);
      } else if (instances.has(target)) {
        const [instance, inputs] = instances.get(target);
        const shown = instance.inputs ?? [];
        const name = targetSlot < shown.length ? shown[targetSlot].name : undefined;
        receiver = inputs.get(this.inputIndex(instance, name));
        if (receiver && receiver.type !== "Reroute") receiver = undefined;
      } else {
        receiver = plain.get(target);
        slot = targetSlot;
      }
      if (receiver && slot < receiver.inputs.length) {
        receiver.inputs[slot].link = this.newLink(source[0], source[1], receiver.id, slot, kind);
      }
    }
  }

  instance(node, flatId, definition, stack) {
    if (stack.includes(definition.id) || stack.length >= MAX_SUBGRAPH_DEPTH) {
      const chain = [...stack, definition.id].join(" -> ");
      throw new Error(`node ${flatId}: subgraph '${definition.name || definition.id}' contains itself (${chain})`);
    }
    const stored = storedValues(node, definition);
    const linked = new Set((node.inputs ?? []).filter((s) => s.link !== null && s.link !== undefined).map((s) => s.name));
    const boundaryIn = new Map();
    for (const [index, slot] of (definition.inputs ?? []).entries()) {
      const id = `${flatId}:in${index}`;
      if (linked.has(slot.name)) {
        boundaryIn.set(index, this.addBoundary(id, "Reroute"));
        this.inputReroutes.add(id);
      } else if (stored.has(slot.name)) {
        boundaryIn.set(index, this.addBoundary(id, "PrimitiveNode", stored.get(slot.name)));
      }
    }
    const boundaryOut = new Map((definition.outputs ?? []).map((_, index) =>
      [index, this.addBoundary(`${flatId}:out${index}`, "Reroute")]));
    this.expand(definition.nodes, definition.links ?? [], `${flatId}:`, [...stack, definition.id], boundaryIn,
      boundaryOut);
    return [node, boundaryIn, boundaryOut];
  }

  dropUnfedInputs() {
    const byId = new Map(this.nodes.map((n) => [n.id, n]));
    for (;;) {
      const unfed = new Set([...this.inputReroutes].filter((id) => byId.get(id).inputs[0].link === null));
      const dead = this.links.filter((link) => unfed.has(link[1]));
      if (!dead.length) return;
      for (const link of dead) byId.get(link[3]).inputs[link[4]].link = null;
      const deadIds = new Set(dead.map((link) => link[0]));
      this.links = this.links.filter((link) => !deadIds.has(link[0]));
      for (const id of unfed) this.inputReroutes.delete(id);
    }
  }
}

/** Values an instance stores for its promoted widgets, by input name (the layouts: graph/subgraphs.py). */
function storedValues(node, definition) {
  const values = node.widgets_values;
  if (values && typeof values === "object" && !Array.isArray(values)) return new Map(Object.entries(values));
  if (!Array.isArray(values) || !values.length) return new Map();
  const shown = (node.inputs ?? []).filter((slot) => slot.widget).map((slot) => slot.name);
  const typed = (definition.inputs ?? []).filter((slot) => WIDGET_TYPES.has(slot.type)).map((slot) => slot.name);
  for (const names of [shown, typed]) {
    if (names.length === values.length) return new Map(names.map((name, i) => [name, values[i]]));
  }
  return new Map();
}

/** A UI workflow with every subgraph instance replaced by its nodes (a new object; returned as is without any). */
export function expandSubgraphs(workflow) {
  const definitions = subgraphDefinitions(workflow);
  if (!(workflow.nodes ?? []).some((n) => n && definitions.has(n.type))) return workflow;
  const expander = new Expander(definitions);
  expander.expand(workflow.nodes, workflow.links ?? [], "", []);
  expander.dropUnfedInputs();
  return { ...workflow, nodes: expander.nodes, links: expander.links };
}
