/**
 * The canvas application: the graph and its canvas, the default workflow on first open, undo/redo by snapshots,
 * queueing (with seed control after each run), errors on the node and input they concern, panels and toolbar.
 * Opening and saving (workflow_files.js) and a run's events (run_events.js) are methods mixed into the class.
 * `window.loom` is this object (tests drive it too).
 */

import { LGraph, LGraphCanvas, LGraphGroup, LiteGraph } from "@comfyorg/litegraph";
import { Api, HttpError } from "./api.js";
import { uiToApi } from "./convert.js";
import { drawErrorLabels, nodeErrorEntries, renderErrorBox } from "./errors.js";
import { download } from "./files.js";
import { PREVIEW_PROPERTY, registerNodes } from "./nodes.js";
import { el, renderPalette, renderQueue, renderResults, renderTemplates, renderWorkflows } from "./panels.js";
import { RunEvents } from "./run_events.js";
import { plainMenu, SlotTooltip } from "./view.js";
import { WorkflowFiles } from "./workflow_files.js";
import { applySeedControl, hideWidget, showWidget } from "./widgets.js";

const STATE_KEY = "latentloom.workflow";
const NAME_KEY = "latentloom.workflowName";
const DEFAULT_TEMPLATE = "txt2img";
const DEFAULT_TITLE = "Txt2img"; // as /templates/index.json titles it
const DEFAULT_WORKFLOW = `/templates/${DEFAULT_TEMPLATE}.json`;
const UNDO_LIMIT = 100;

class App {
  constructor() {
    this.api = new Api((reason) => this.askToken(reason));
    this.objectInfo = {};
    this.graph = new LGraph();
    this.canvasElement = document.getElementById("graph");
    this.canvas = new LGraphCanvas(this.canvasElement, this.graph);
    this.canvas.show_info = false;
    this.canvas.low_quality_zoom_threshold = 0.3;
    // litegraph outlines the graph's origin rectangle (the canvas size at 1:1) in the grid: it matches nothing here
    this.canvas.render_canvas_border = false;
    // litegraph's own menus mark an entry with an emoji, an empty box where no emoji font is installed
    this.graph.onGetNodeMenuOptions = (options) => plainMenu(options);
    this.canvas.getExtraMenuOptions = (_canvas, options) => { plainMenu(options); };
    this.canvas.onDrawOverlay = (ctx) => { this.errorLabels = drawErrorLabels(ctx, this.canvas, this.graph, this.errors); };
    this.errorLabels = [];
    this.fitted = null; // the view fitView set, while the user has not moved it: a resize fits again
    this.previewSources = {}; // id of a PreviewImage added at queue time → [node id, output slot] it shows
    this.undo = [];
    this.redo = [];
    this.snapshot = null;
    this.workflowName = null;
    this.run = { promptId: null, node: null, progress: {}, total: 0, done: new Set() };
    this.nodeImages = {}; // node id → HTMLImageElement[] (outputs) ; previews in this.previews
    this.previews = {};
    this.errors = {}; // node id → [{input, message}]
  }

  async start() {
    this.resize();
    addEventListener("resize", () => this.resize());
    await this.loadObjectInfo();
    this.bindUi();
    this.bindEvents();
    this.api.connect();
    const saved = localStorage.getItem(STATE_KEY);
    let loaded = false;
    if (saved) {
      try {
        this.loadWorkflow(JSON.parse(saved), { keepHistory: false, name: localStorage.getItem(NAME_KEY) || null });
        loaded = true;
      } catch (error) {
        console.warn("saved state could not be restored", error);
      }
    }
    if (!loaded) this.loadWorkflow(await this.api.json(DEFAULT_WORKFLOW), { keepHistory: false, name: DEFAULT_TITLE });
    this.refreshPanels();
    document.body.dataset.ready = "true";
  }

  /** Fit the canvas to its area; a view that was fitted (and not moved since) is fitted again to the new size. */
  resize() {
    const box = this.canvasElement.parentElement.getBoundingClientRect();
    const wasFitted = this.isFitted();
    this.canvas.resize(Math.floor(box.width), Math.floor(box.height));
    if (wasFitted) this.fitView();
  }

  isFitted() {
    const { ds } = this.canvas;
    return this.fitted !== null && ds.scale === this.fitted.scale && ds.offset[0] === this.fitted.offset[0] &&
      ds.offset[1] === this.fitted.offset[1];
  }

  /** The workflow's name in the toolbar and the window title. */
  setName(name) {
    this.workflowName = name;
    const label = document.getElementById("workflow-name");
    label.textContent = name ?? "unsaved workflow";
    label.title = name ?? "";
    if (name) localStorage.setItem(NAME_KEY, name);
    else localStorage.removeItem(NAME_KEY);
    document.title = name ? `${name} - Latent Loom` : "Latent Loom";
  }

  async loadObjectInfo() {
    this.objectInfo = await this.api.json("/object_info");
    registerNodes(this.objectInfo, this);
    renderPalette(document.getElementById("palette"), this.objectInfo, (type) => this.addNode(type));
  }

  /** Fresh combo lists (models, uploads) from the server, applied to the nodes on the canvas. */
  async refreshCombos() {
    const before = JSON.stringify(this.comboValues());
    this.objectInfo = await this.api.json("/object_info");
    for (const node of this.graph._nodes) {
      const info = this.objectInfo[node.type];
      for (const widget of node.widgets ?? []) {
        const spec = info?.input?.required?.[widget.name] ?? info?.input?.optional?.[widget.name];
        if (spec && Array.isArray(spec[0])) widget.options.values = [...spec[0]];
      }
    }
    registerNodes(this.objectInfo, this);
    this.canvas.setDirty(true, true);
    const changed = JSON.stringify(this.comboValues()) !== before;
    const count = new Set(Object.values(this.comboValues()).flat()).size;
    this.toast(`Lists refreshed from the server (${count} choices on this graph${changed ? ", some new" : ", none changed"})`);
  }

  /** Every combo widget's choices on the canvas, by node and widget. */
  comboValues() {
    const values = {};
    for (const node of this.graph._nodes) {
      for (const widget of node.widgets ?? []) {
        if (widget.type === "combo" && !widget.controls) values[`${node.id}.${widget.name}`] = [...(widget.options.values ?? [])];
      }
    }
    return values;
  }

  // graph editing ---------------------------------------------------------------------------------
  addNode(type) {
    const node = LiteGraph.createNode(type);
    node.pos = this.freeSpot(node.size);
    this.graph.add(node);
    this.changed();
    return node;
  }

  /** The first place in view (scanning rows from the top left) where a node of `size` overlaps no other node. */
  freeSpot([width, height]) {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const [left, top] = this.canvas.convertCanvasToOffset([0, 0]);
    const [right, bottom] = this.canvas.convertCanvasToOffset([this.canvasElement.width, this.canvasElement.height]);
    const overlaps = (x, y) => this.graph._nodes.some((n) => x < n.pos[0] + n.size[0] + 30 && n.pos[0] < x + width + 30 &&
      y - title < n.pos[1] + n.size[1] + 30 && n.pos[1] - title < y + height + 30);
    for (let y = top + title + 30; y + height < bottom; y += 20) {
      for (let x = left + 30; x + width < right; x += 20) if (!overlaps(x, y)) return [x, y];
    }
    return [left + 30, top + title + 30];
  }

  /** An empty graph at 1:1 (undoable). */
  newWorkflow() {
    this.graph.clear();
    this.canvas.ds.scale = 1;
    this.canvas.ds.offset = [0, 0];
    this.fitted = null;
    this.clearRunState();
    this.setName(null);
    this.changed();
    this.canvas.setDirty(true, true);
  }

  /** "Convert to input": the widget hidden, a socket row in its place (see widgets.js hideWidget). */
  widgetToInput(node, widget) {
    const existing = node.inputs.find((slot) => slot.widget?.name === widget.name);
    if (existing) {  // a saved input on the widget (ComfyUI's layout): the same socket, now a row
      existing.convertedWidget = widget.name;
      delete existing.widget;
    } else {
      const slot = node.addInput(widget.name, widget.inputType ?? "*");
      slot.convertedWidget = widget.name;
      slot.color_on = slot.color_off = LGraphCanvas.link_type_colors[slot.type];
    }
    hideWidget(widget);
    node.setSize([node.size[0], node.computeSize()[1]]);
    this.changed();
    this.canvas.setDirty(true, true);
  }

  inputToWidget(node, index) {
    const name = node.inputs[index]?.convertedWidget ?? node.inputs[index]?.widget?.name;
    node.disconnectInput(index);
    node.removeInput(index);
    const widget = node.widgets?.find((w) => w.name === name);
    if (widget) showWidget(widget);
    node.setSize([node.size[0], node.computeSize()[1]]);
    this.changed();
    this.canvas.setDirty(true, true);
  }

  /** A group around the selected nodes, its title kept in view; with nothing selected, say how to select. */
  groupSelected() {
    const nodes = [...this.canvas.selectedItems].filter((item) => item instanceof LiteGraph.LGraphNode || item.widgets !== undefined);
    if (!nodes.length) {
      this.toast("Group: select the nodes to group first (click a title, Ctrl+click for more, Ctrl+drag a box, Ctrl+A for all)");
      return null;
    }
    const group = new LGraphGroup("Group");
    this.graph.add(group);
    group.resizeTo(nodes);
    const [, top] = this.canvas.convertOffsetToCanvas([group.pos[0], group.pos[1]]);
    const [left] = this.canvas.convertOffsetToCanvas([group.pos[0], group.pos[1]]);
    const [right, bottom] = this.canvas.convertOffsetToCanvas([group.pos[0] + group.size[0], group.pos[1] + group.size[1]]);
    const { width, height } = this.canvasElement;
    if (top < 0 || left < 0 || right > width || bottom > height) this.fitView();
    this.changed();
    this.canvas.setDirty(true, true);
    return group;
  }

  /** What a run or a loaded workflow leaves on screen: errors, images on nodes, the live preview. */
  clearRunState() {
    this.errors = {};
    for (const media of Object.values(this.nodeImages).flat()) media.pause?.(); // a video result stops playing
    this.nodeImages = {};
    this.previews = {};
    this.renderErrors(null);
    this.clearLivePreview();
  }

  clearLivePreview() {
    const preview = document.getElementById("live-preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
  }

  serialize() {
    return this.graph.serialize();
  }

  /** Record the graph's state if it changed: undo history and the state kept for the next visit. */
  changed() {
    const state = JSON.stringify(this.serialize());
    if (state === this.snapshot) return;
    if (this.snapshot !== null) {
      this.undo.push(this.snapshot);
      if (this.undo.length > UNDO_LIMIT) this.undo.shift();
      this.redo = [];
    }
    this.snapshot = state;
    localStorage.setItem(STATE_KEY, state);
  }

  restore(state) {
    this.graph.configure(JSON.parse(state));
    this.snapshot = state;
    localStorage.setItem(STATE_KEY, state);
    this.canvas.setDirty(true, true);
  }

  undoStep() {
    this.changed();
    if (!this.undo.length) return;
    this.redo.push(this.snapshot);
    this.restore(this.undo.pop());
  }

  redoStep() {
    if (!this.redo.length) return;
    this.undo.push(this.snapshot);
    this.restore(this.redo.pop());
  }

  // queueing ----------------------------------------------------------------------------------------
  apiPrompt() {
    return uiToApi(this.serialize(), this.objectInfo);
  }

  /**
   * The API prompt as queued: the workflow's, plus a PreviewImage on every IMAGE output of a node marked "preview
   * on node" (its id says which node and slot; its images are drawn on that node).
   */
  queuedPrompt(workflow) {
    const prompt = uiToApi(workflow, this.objectInfo);
    this.previewSources = {};
    for (const node of this.graph._nodes) {
      if (!node.properties?.[PREVIEW_PROPERTY] || !(String(node.id) in prompt)) continue;
      node.outputs.forEach((output, slot) => {
        if (output.type !== "IMAGE") return;
        const id = `${node.id}-preview-${slot}`;
        prompt[id] = { class_type: "PreviewImage", inputs: { images: [String(node.id), slot] },
                       _meta: { title: `Preview of ${node.title}` } };
        this.previewSources[id] = [String(node.id), slot];
      });
    }
    return prompt;
  }

  async queuePrompt() {
    const workflow = this.serialize();
    const promptBody = { prompt: this.queuedPrompt(workflow), client_id: this.api.clientId,
                         extra_data: { extra_pnginfo: { workflow } } };
    this.errors = {};
    this.renderErrors(null);
    try {
      const result = await this.api.json("/prompt", { method: "POST", body: promptBody });
      if (Object.keys(result.node_errors ?? {}).length) this.showNodeErrors(result.node_errors, null);
      for (const node of this.graph._nodes) {
        for (const widget of node.widgets ?? []) if (widget.control && !widget.hidden) applySeedControl(widget);
      }
      this.changed();
      this.refreshPanels();
      return result.prompt_id;
    } catch (error) {
      if (error instanceof HttpError && error.body?.error) {
        this.showNodeErrors(error.body.node_errors ?? {}, error.body.error);
        return null;
      }
      throw error;
    } finally {
      this.canvas.setDirty(true, true);
    }
  }

  /** Errors from the server on the node and input they concern (validation's node_errors). */
  showNodeErrors(nodeErrors, topError) {
    this.errors = nodeErrorEntries(nodeErrors);
    this.renderErrors(topError);
    this.canvas.setDirty(true, true);
  }

  renderErrors(topError) {
    renderErrorBox(document.getElementById("errors"), topError, this.errors, this.graph, (node) => {
      this.canvas.centerOnNode(node);
      this.canvas.setDirty(true, true);
    });
  }

  // panels and UI -----------------------------------------------------------------------------------
  showPanel(name) {
    for (const tab of document.querySelectorAll("[data-panel-tab]")) tab.classList.toggle("active", tab.dataset.panelTab === name);
    for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== name;
    this.refreshPanel(name);
  }

  refreshPanels() {
    for (const name of ["queue", "results", "workflows"]) this.refreshPanel(name);
  }

  refreshPanel(name) {
    const container = document.querySelector(`[data-panel="${name}"]`);
    const render = { queue: renderQueue, results: renderResults, workflows: renderWorkflows, templates: renderTemplates }[name];
    render(container, this.api, this).catch((error) => this.toast(error.message));
  }

  toast(message) {
    const box = el("div", { className: "toast", textContent: message });
    document.getElementById("toasts").append(box);
    setTimeout(() => box.remove(), 6000);
  }

  /** The token dialog: resolves to the token typed, or null when cancelled. */
  askToken(reason) {
    const dialog = document.getElementById("token-dialog");
    document.getElementById("token-reason").textContent = reason || "This server requires an access token.";
    dialog.showModal();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? document.getElementById("token-input").value : null),
                              { once: true });
    });
  }

  /** The textarea over a multiline widget; the value is committed when it loses focus. */
  editText(node, widget) {
    const editor = document.getElementById("text-editor");
    const scale = this.canvas.ds.scale;
    const [x, y] = this.canvas.convertOffsetToCanvas([node.pos[0] + 12, node.pos[1] + (widget.last_y ?? 0)]);
    const box = this.canvasElement.getBoundingClientRect();
    Object.assign(editor.style, { left: `${box.left + x}px`, top: `${box.top + y}px`,
                                  width: `${(node.size[0] - 24) * scale}px`, height: `${84 * scale}px` });
    editor.value = widget.value;
    editor.hidden = false;
    editor.dataset.node = node.id;
    editor.dataset.widget = widget.name;
    editor.focus();
    editor.onblur = () => {
      widget.value = editor.value;
      editor.hidden = true;
      this.changed();
      this.canvas.setDirty(true, false);
    };
  }

  bindUi() {
    const byId = (id) => document.getElementById(id);
    byId("queue-button").onclick = () => this.queuePrompt().catch((e) => this.toast(e.message));
    byId("save-file").onclick = () => download(`${(this.workflowName ?? "workflow").replace(/\.json$/, "")}.json`, JSON.stringify(this.serialize(), null, 1));
    byId("export-api").onclick = () => download(`${(this.workflowName ?? "workflow").replace(/\.json$/, "")}_api.json`, JSON.stringify(this.apiPrompt(), null, 1));
    byId("open-file").onclick = () => byId("file-input").click();
    byId("file-input").onchange = (e) => e.target.files[0] && this.openFile(e.target.files[0]).catch((err) => this.toast(err.message));
    byId("new").onclick = () => this.newWorkflow();
    byId("load-default").onclick = () => this.openTemplate(DEFAULT_TEMPLATE, DEFAULT_TITLE).catch((e) => this.toast(e.message));
    byId("refresh").onclick = () => this.refreshCombos().catch((e) => this.toast(e.message));
    byId("undo").onclick = () => this.undoStep();
    byId("redo").onclick = () => this.redoStep();
    byId("group").onclick = () => this.groupSelected();
    for (const tab of document.querySelectorAll("[data-panel-tab]")) tab.onclick = () => this.showPanel(tab.dataset.panelTab);
    const area = this.canvasElement.parentElement;
    area.addEventListener("dragover", (e) => e.preventDefault());
    area.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer?.files?.[0];
      if (file) this.dropFile(file, e).catch((err) => this.toast(err.message));
    });
    this.slotTooltip = new SlotTooltip(this, document.getElementById("slot-tooltip"));
    // changes are picked up after every gesture: pointer and key releases
    this.canvasElement.addEventListener("pointerup", () => setTimeout(() => this.changed(), 0));
    document.addEventListener("keyup", () => setTimeout(() => this.changed(), 0));
    document.addEventListener("keydown", (e) => {
      if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement) return;
      const mod = e.ctrlKey || e.metaKey;
      if (mod && e.key.toLowerCase() === "z" && !e.shiftKey) { this.undoStep(); e.preventDefault(); }
      else if (mod && (e.key.toLowerCase() === "y" || (e.key.toLowerCase() === "z" && e.shiftKey))) { this.redoStep(); e.preventDefault(); }
      else if (mod && e.key === "Enter") { this.queuePrompt().catch((err) => this.toast(err.message)); }
    });
    this.showPanel("results");
  }

  // helpers for tests and tools -----------------------------------------------------------------------
  /** Page coordinates of a node's slot (input or output), for dragging connections. */
  slotPosition(nodeId, isInput, slot) {
    const node = this.graph.getNodeById(nodeId);
    const pos = node.getConnectionPos(isInput, slot);
    const [x, y] = this.canvas.convertOffsetToCanvas([pos[0], pos[1]]);
    const box = this.canvasElement.getBoundingClientRect();
    return [box.left + x, box.top + y];
  }

  /** Page coordinates of a point on a node's title bar (to select or drag it). */
  titlePosition(nodeId) {
    const node = this.graph.getNodeById(nodeId);
    const [x, y] = this.canvas.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
    const box = this.canvasElement.getBoundingClientRect();
    return [box.left + x, box.top + y];
  }

  setWidget(nodeId, name, value) {
    const widget = this.graph.getNodeById(nodeId).widgets.find((w) => w.name === name);
    widget.value = value;
    this.changed();
    this.canvas.setDirty(true, false);
  }
}

Object.assign(App.prototype, WorkflowFiles, RunEvents);

const app = new App();
window.loom = app;
app.start().catch((error) => {
  console.error(error);
  document.body.dataset.ready = "error";
  app.toast(`The canvas could not start: ${error.message}`);
});
