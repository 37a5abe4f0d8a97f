/**
 * Opening and saving workflows, methods of the canvas application (mixed into App in app.js): UI or API format
 * (an API graph laid out by depth), the server's saved workflows and shipped templates, files chosen or dropped
 * (a PNG written by SaveImage carries its workflow), images dropped or chosen for an upload widget, fitting the view.
 */

import { LiteGraph } from "@comfyorg/litegraph";
import { isApiWorkflow, isUiWorkflow } from "./convert.js";
import { layoutApiGraph, pngTextChunks } from "./files.js";
import { PREVIEW_PROPERTY } from "./nodes.js";
import { el } from "./panels.js";
import { loadMedia } from "./view.js";

export const WorkflowFiles = {
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
  },

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
  },

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
  },

  async openSaved(name) {
    this.loadWorkflow(await this.api.json(`/workflows/${encodeURIComponent(name)}`), { name });
  },

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
  },

  /** A workflow file (JSON, or a PNG carrying one), named after the file. */
  async openFile(file) {
    if (file.type === "image/png" || file.name.toLowerCase().endsWith(".png")) {
      const chunks = pngTextChunks(await file.arrayBuffer());
      if (chunks.workflow) return this.loadWorkflow(JSON.parse(chunks.workflow), { name: file.name });
      if (chunks.prompt) return this.loadWorkflow(JSON.parse(chunks.prompt), { name: file.name });
      throw new Error(`${file.name} carries no workflow (no 'workflow' or 'prompt' text chunk)`);
    }
    this.loadWorkflow(JSON.parse(await file.text()), { name: file.name });
  },

  /** A shipped workflow from /templates/, named by its title. */
  async openTemplate(name, title = name) {
    this.loadWorkflow(await this.api.json(`/templates/${encodeURIComponent(name)}.json`), { name: title });
  },

  /** Show (or stop showing) a node's IMAGE outputs on it after each run ("preview on node"). */
  setPreviewOnNode(node, on) {
    if (on) node.properties[PREVIEW_PROPERTY] = true;
    else delete node.properties[PREVIEW_PROPERTY];
    this.changed();
    this.canvas.setDirty(true, false);
  },

  /** A file dropped on the canvas: an image onto a LoadImage-like node is uploaded, anything else is opened. */
  async dropFile(file, event) {
    const node = this.nodeAt(this.canvas.convertEventToCanvasOffset(event));
    const upload = node && this.uploadWidget(node);
    if (upload && file.type.startsWith(this.isVideoUpload(node) ? "video/" : "image/")) return this.uploadTo(node, upload, file);
    return this.openFile(file);
  },

  /**
   * The top-most node whose box (title bar included) holds the graph point. Computed from pos and size rather than
   * litegraph's getNodeOnPos, whose hit boxes are only refreshed when a frame is drawn: a drop right after a
   * workflow is opened would otherwise miss every node.
   */
  nodeAt([x, y]) {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    return this.graph._nodes.findLast((n) => x >= n.pos[0] && x <= n.pos[0] + n.size[0] &&
      y >= n.pos[1] - title && y <= n.pos[1] + n.size[1]) ?? null;
  },

  uploadWidget(node) {
    const info = this.objectInfo[node.type];
    const name = Object.entries(info?.input?.required ?? {}).find(([, spec]) => spec[1]?.image_upload || spec[1]?.video_upload)?.[0];
    return name ? node.widgets.find((w) => w.name === name) : null;
  },

  /** Whether the node's upload widget takes videos (LoadVideo's `video_upload`) rather than images. */
  isVideoUpload(node) {
    const info = this.objectInfo[node.type];
    return Object.values(info?.input?.required ?? {}).some((spec) => spec[1]?.video_upload);
  },

  async uploadTo(node, widget, file) {
    const stored = await this.api.uploadImage(file);
    const name = stored.subfolder ? `${stored.subfolder}/${stored.name}` : stored.name;
    if (!widget.options.values.includes(name)) widget.options.values.push(name);
    widget.value = name;
    const url = this.api.viewUrl({ filename: stored.name, subfolder: stored.subfolder, type: "input" });
    this.nodeImages[node.id] = [await loadMedia(url, stored.name, () => this.canvas.setDirty(true, false))];
    this.changed();
    this.canvas.setDirty(true, true);
  },

  chooseUpload(node, widget) {
    const input = el("input", { type: "file", accept: this.isVideoUpload(node) ? "video/*" : "image/*" });
    input.addEventListener("change", () => input.files[0] && this.uploadTo(node, widget, input.files[0]).catch((e) => this.toast(e.message)));
    input.click();
  },
};
