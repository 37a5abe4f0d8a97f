/**
 * The canvas application: the graph and its canvas, the default workflow on first open, undo/redo by snapshots,
 * queueing (with seed control after each run), the run's events drawn on the nodes, errors on the node and input
 * they concern, open/save/drop of workflows and images. `window.loom` is this object (tests drive it too).
 */

import { LGraph, LGraphCanvas, LGraphGroup, LiteGraph } from "@comfyorg/litegraph";
import { Api, HttpError } from "./api.js";
import { isApiWorkflow, isUiWorkflow, uiToApi } from "./convert.js";
import { drawErrorLabels, nodeErrorEntries, renderErrorBox } from "./errors.js";
import { download, layoutApiGraph, pngTextChunks } from "./files.js";
import { PREVIEW_PROPERTY, registerNodes } from "./nodes.js";
import { el, renderPalette, renderQueue, renderResults, renderTemplates, renderWorkflows } from "./panels.js";
import { drawImageGrid, plainMenu, SlotTooltip } from "./view.js";
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

  // open and save -----------------------------------------------------------------------------------
  /** Open a workflow: UI format as saved, API format laid out by depth. */
  loadWorkflow(data, { keepHistory = true, name = null } = {}) {
    if (isUiWorkflow(data)) {
      this.graph.configure(structuredClone(data));
    } else if (isApiWorkflow(data)) {
      this.loadApiWorkflow(data);
    } else {
      throw new Error("not a workflow: neither the UI format (nodes and links) nor the API format");
    }
    this.clearRunState();
    this.setName(name);
    if (!keepHistory) {
      this.undo = [];
      this.redo = [];
      this.snapshot = null;
    }
    this.changed();
    this.fitView();
  }

  /** Scale and offset so that every node and group is in view (at most 1:1). */
  fitView() {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    const boxes = [...this.graph._nodes.map((n) => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]),
                   ...this.graph._groups.map((g) => [g.pos[0], g.pos[1], g.pos[0] + g.size[0], g.pos[1] + g.size[1]])];
    if (!boxes.length) return;
    const left = Math.min(...boxes.map((b) => b[0])) - 20;
    const top = Math.min(...boxes.map((b) => b[1])) - 20;
    const right = Math.max(...boxes.map((b) => b[2])) + 20;
    const bottom = Math.max(...boxes.map((b) => b[3])) + 20;
    const { width, height } = this.canvasElement;
    const scale = Math.min(1, width / (right - left), height / (bottom - top));
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset = [-left + (width / scale - (right - left)) / 2, -top];
    this.fitted = { scale, offset: [...this.canvas.ds.offset] };
    this.canvas.setDirty(true, true);
  }

  loadApiWorkflow(prompt) {
    this.graph.clear();
    const positions = layoutApiGraph(prompt);
    const nodes = {};
    for (const [id, entry] of Object.entries(prompt)) {
      const node = LiteGraph.createNode(entry.class_type);
      if (!node) throw new Error(`unknown node type ${entry.class_type} (node ${id})`);
      node.id = Number(id) || id;
      node.pos = positions[id];
      if (entry._meta?.title && entry._meta.title !== node.title) node.title = entry._meta.title;
      this.graph.add(node);
      nodes[id] = node;
      for (const widget of node.widgets ?? []) {
        if (!(widget.name in entry.inputs)) continue;
        const value = entry.inputs[widget.name];
        if (Array.isArray(value)) continue; // a link; connected below
        widget.value = value?.__value__ ?? value;
        if (widget.control) widget.control.value = "fixed";
      }
    }
    for (const [id, entry] of Object.entries(prompt)) {
      for (const [name, value] of Object.entries(entry.inputs)) {
        if (!Array.isArray(value) || value.length !== 2 || !nodes[value[0]]) continue;
        const target = nodes[id];
        let slot = target.inputs.findIndex((s) => s.name === name);
        if (slot < 0) {
          const widget = target.widgets?.find((w) => w.name === name);
          if (!widget) continue;
          this.widgetToInput(target, widget);
          slot = target.inputs.findIndex((s) => s.name === name);
        }
        nodes[value[0]].connect(value[1], target, slot);
      }
    }
  }

  async openSaved(name) {
    this.loadWorkflow(await this.api.json(`/workflows/${encodeURIComponent(name)}`), { name });
  }

  async saveToServer(askName) {
    let name = this.workflowName;
    if (askName || !name) {
      name = prompt("Save workflow as:", name ?? "my-workflow.json");
      if (!name) return;
    }
    if (!name.endsWith(".json")) name += ".json";
    await this.api.json(`/workflows/${encodeURIComponent(name)}`, { method: "PUT", body: this.serialize() });
    this.setName(name);
    this.showPanel("workflows");
  }

  /** A workflow file (JSON, or a PNG carrying one), named after the file. */
  async openFile(file) {
    if (file.type === "image/png" || file.name.toLowerCase().endsWith(".png")) {
      const chunks = pngTextChunks(await file.arrayBuffer());
      if (chunks.workflow) return this.loadWorkflow(JSON.parse(chunks.workflow), { name: file.name });
      if (chunks.prompt) return this.loadWorkflow(JSON.parse(chunks.prompt), { name: file.name });
      throw new Error(`${file.name} carries no workflow (no 'workflow' or 'prompt' text chunk)`);
    }
    this.loadWorkflow(JSON.parse(await file.text()), { name: file.name });
  }

  /** A shipped workflow from /templates/, named by its title. */
  async openTemplate(name, title = name) {
    this.loadWorkflow(await this.api.json(`/templates/${encodeURIComponent(name)}.json`), { name: title });
  }

  /** Show (or stop showing) a node's IMAGE outputs on it after each run ("preview on node"). */
  setPreviewOnNode(node, on) {
    if (on) node.properties[PREVIEW_PROPERTY] = true;
    else delete node.properties[PREVIEW_PROPERTY];
    this.changed();
    this.canvas.setDirty(true, false);
  }

  /** A file dropped on the canvas: an image onto a LoadImage-like node is uploaded, anything else is opened. */
  async dropFile(file, event) {
    const node = this.nodeAt(this.canvas.convertEventToCanvasOffset(event));
    const upload = node && this.uploadWidget(node);
    if (upload && file.type.startsWith("image/")) return this.uploadTo(node, upload, file);
    return this.openFile(file);
  }

  /**
   * The top-most node whose box (title bar included) holds the graph point. Computed from pos and size rather than
   * litegraph's getNodeOnPos, whose hit boxes are only refreshed when a frame is drawn: a drop right after a
   * workflow is opened would otherwise miss every node.
   */
  nodeAt([x, y]) {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    return this.graph._nodes.findLast((n) => x >= n.pos[0] && x <= n.pos[0] + n.size[0] &&
      y >= n.pos[1] - title && y <= n.pos[1] + n.size[1]) ?? null;
  }

  uploadWidget(node) {
    const info = this.objectInfo[node.type];
    const name = Object.entries(info?.input?.required ?? {}).find(([, spec]) => spec[1]?.image_upload)?.[0];
    return name ? node.widgets.find((w) => w.name === name) : null;
  }

  async uploadTo(node, widget, file) {
    const stored = await this.api.uploadImage(file);
    const name = stored.subfolder ? `${stored.subfolder}/${stored.name}` : stored.name;
    if (!widget.options.values.includes(name)) widget.options.values.push(name);
    widget.value = name;
    this.nodeImages[node.id] = [await loadImage(this.api.viewUrl({ filename: stored.name, subfolder: stored.subfolder, type: "input" }))];
    this.changed();
    this.canvas.setDirty(true, true);
  }

  chooseUpload(node, widget) {
    const input = el("input", { type: "file", accept: "image/*" });
    input.addEventListener("change", () => input.files[0] && this.uploadTo(node, widget, input.files[0]).catch((e) => this.toast(e.message)));
    input.click();
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

  // events of a run ---------------------------------------------------------------------------------
  bindEvents() {
    const on = (type, handler) => this.api.addEventListener(type, (e) => handler(e.detail));
    on("status", (data) => {
      document.getElementById("queue-size").textContent = data?.status?.exec_info?.queue_remaining ?? 0;
      this.refreshPanel("queue");
    });
    on("execution_start", (data) => {
      this.run = { promptId: data.prompt_id, node: null, progress: {}, total: 0, done: new Set() };
      this.run.total = this.graph._nodes.length;
      this.previews = {};
      this.setOverall(0);
    });
    on("execution_cached", (data) => { for (const id of data.nodes ?? []) this.run.done.add(String(id)); this.setOverall(); });
    on("executing", (data) => {
      if (this.run.node !== null) this.run.done.add(String(this.run.node));
      this.run.node = data.node;
      if (data.node === null) {
        this.setOverall(1);
        this.previews = {}; // a sampler's last latent preview is not its result
        this.clearLivePreview();
        this.refreshPanels();
      } else {
        this.setOverall();
      }
      this.canvas.setDirty(true, true);
    });
    on("progress", (data) => {
      this.run.progress[String(data.node)] = data.value / data.max;
      this.setOverall();
      this.canvas.setDirty(true, false);
    });
    on("executed", async (data) => {
      const images = data.output?.images ?? [];
      const id = this.previewSources[String(data.node)]?.[0] ?? String(data.node);
      this.nodeImages[id] = await Promise.all(images.map((image) => loadImage(this.api.viewUrl(image))));
      delete this.previews[id];
      this.canvas.setDirty(true, false);
      this.refreshPanel("results");
    });
    on("execution_error", (data) => {
      this.errors[String(data.node_id)] = [{ input: null, message: `${data.exception_type}: ${data.exception_message}` }];
      this.renderErrors({ message: `Error in #${data.node_id} ${data.node_type}`, details: data.exception_message });
      this.run.node = null;
      this.clearLivePreview();
      this.refreshPanels();
    });
    on("execution_interrupted", (data) => {
      this.toast(`Prompt ${data.prompt_id.slice(0, 8)} interrupted`);
      this.run.node = null;
      this.clearLivePreview();
      this.refreshPanels();
    });
    on("b_preview", async ({ blob, meta }) => {
      const id = String(meta.node_id ?? meta.display_node_id ?? this.run.node);
      const url = URL.createObjectURL(blob);
      const image = await loadImage(url);
      if (this.run.node === null) return URL.revokeObjectURL(url); // a frame that arrived after its run ended
      this.previews[id] = image;
      const preview = document.getElementById("live-preview");
      if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
      preview.src = url;
      this.canvas.setDirty(true, false);
    });
    on("reconnected", () => this.refreshPanels());
  }

  setOverall(value) {
    const { done, progress, total } = this.run;
    const running = this.run.node !== null ? (progress[String(this.run.node)] ?? 0) : 0;
    const fraction = value ?? (total ? Math.min(1, (done.size + running) / total) : 0);
    document.getElementById("overall-progress").value = fraction;
  }

  /** Drawn over each node: running outline and progress, errors, output images or the live preview. */
  drawNodeState(node, ctx) {
    const id = String(node.id);
    const [width, height] = node.size;
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    if (node.flags?.collapsed) return;
    const images = this.previews[id] ? [this.previews[id]] : this.nodeImages[id];
    if (images?.length) drawImageGrid(ctx, images, width, height + 6);
    if (String(this.run.node) === id) {
      ctx.strokeStyle = "#4caf50";
      ctx.lineWidth = 3;
      ctx.strokeRect(-3, -title - 3, width + 6, height + title + 6);
      const p = this.run.progress[id];
      if (p !== undefined) {
        ctx.fillStyle = "#4caf50";
        ctx.fillRect(0, -title, width * p, 4);
      }
    }
    const errors = this.errors[id];
    if (errors?.length) {
      ctx.strokeStyle = "#ff4040";
      ctx.lineWidth = 3;
      ctx.strokeRect(-3, -title - 3, width + 6, height + title + 6);
      // the messages are drawn over every node by drawErrorLabels (errors.js), readable at any zoom
      for (const widget of node.widgets ?? []) {
        if (errors.some((e) => e.input === widget.name) && widget.last_y !== undefined) {
          ctx.strokeRect(10, widget.last_y, width - 20, LiteGraph.NODE_WIDGET_HEIGHT);
        }
      }
    }
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

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`could not load ${url}`));
    image.src = url;
  });
}

const app = new App();
window.loom = app;
app.start().catch((error) => {
  console.error(error);
  document.body.dataset.ready = "error";
  app.toast(`The canvas could not start: ${error.message}`);
});
