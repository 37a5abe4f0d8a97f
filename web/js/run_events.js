/**
 * A run's events on the canvas, methods of the canvas application (mixed into App in app.js): progress overall and
 * per node, previews (the live one goes when the run ends), output images on their node (and on a node marked
 * "preview on node"), errors, and the state drawn over each node.
 */

import { LiteGraph } from "@comfyorg/litegraph";
import { drawImageGrid, loadImage, loadMedia } from "./view.js";

export const RunEvents = {
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
      this.refreshPanel("queue"); // the prompt left "pending": no status event says so
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
      const redraw = () => this.canvas.setDirty(true, false); // a video output plays on its node
      const loaded = images.map((image) => loadMedia(this.api.viewUrl(image), image.filename, redraw).catch(() => null));
      for (const media of this.nodeImages[id] ?? []) media.pause?.(); // the node's earlier video result
      this.nodeImages[id] = (await Promise.all(loaded)).filter(Boolean); // one the browser cannot play is left out
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
  },

  setOverall(value) {
    const { done, progress, total } = this.run;
    const running = this.run.node !== null ? (progress[String(this.run.node)] ?? 0) : 0;
    const fraction = value ?? (total ? Math.min(1, (done.size + running) / total) : 0);
    document.getElementById("overall-progress").value = fraction;
  },

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
  },
};
