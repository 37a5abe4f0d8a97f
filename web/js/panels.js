/**
 * The DOM around the canvas: the node palette (searchable, grouped by category), the queue panel, the results
 * panel (this session's and earlier runs from /history: prompt, seed, time taken, images), the server-side
 * workflows panel and the shipped templates (from /templates/index.json, with their drawn thumbnails).
 * Labels are plain text, never emoji: a machine without an emoji font draws those as empty boxes.
 */

import { formatDuration, summarize } from "./history.js";
import { isVideoName } from "./view.js";

const el = (tag, { dataset = {}, ...props } = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

export { el };

/** The palette: categories as collapsible groups; typing filters by name, display name, category, description. */
export function renderPalette(container, objectInfo, onPick) {
  const search = el("input", { type: "search", placeholder: "Search nodes…", className: "palette-search" });
  const list = el("div", { className: "palette-list" });
  container.replaceChildren(search, list);
  const byCategory = {};
  for (const [type, info] of Object.entries(objectInfo)) {
    if (info.deprecated) continue;
    (byCategory[info.category || "other"] ??= []).push([type, info]);
  }
  const draw = () => {
    const query = search.value.trim().toLowerCase();
    list.replaceChildren();
    for (const category of Object.keys(byCategory).sort()) {
      const items = byCategory[category].filter(([type, info]) => !query ||
        [type, info.display_name, category, info.description].some((t) => String(t ?? "").toLowerCase().includes(query)));
      if (!items.length) continue;
      // the caret is ours (not the list marker) so it stays on the first line; long names wrap after a "/"
      const name = el("span", { className: "palette-name" });
      category.split("/").forEach((part, i, parts) => {
        name.append(part + (i < parts.length - 1 ? "/" : ""));
        if (i < parts.length - 1) name.append(el("wbr"));
      });
      const group = el("details", { className: "palette-group", open: Boolean(query) },
                       el("summary", { title: category }, el("span", { className: "palette-caret" }), name));
      for (const [type, info] of items.sort((a, b) => (a[1].display_name || a[0]).localeCompare(b[1].display_name || b[0]))) {
        const tooltip = [info.description, `(${type})`].filter(Boolean).join("\n");
        group.append(el("button", { className: "palette-item", textContent: info.display_name || type,
                                    title: tooltip, onclick: () => onPick(type), dataset: { type } }));
      }
      list.append(group);
    }
  };
  search.addEventListener("input", draw);
  draw();
}

/** Queue panel: running and pending prompts with cancel buttons, and clear. */
export async function renderQueue(container, api) {
  const queue = await api.json("/queue");
  const row = (item, running) => {
    const [number, promptId] = item;
    const cancel = el("button", { textContent: "Cancel", className: "cancel", onclick: async () => {
      if (running) await api.json("/interrupt", { method: "POST", body: { prompt_id: promptId } });
      else await api.json("/queue", { method: "POST", body: { delete: [promptId] } });
      renderQueue(container, api);
    } });
    return el("li", { className: running ? "running" : "pending", dataset: { promptId } },
              el("span", { className: `badge ${running ? "running" : "pending"}`, textContent: running ? "running" : "pending" }),
              el("span", { className: "queue-id", textContent: `#${number} ${promptId.slice(0, 8)}` }),
              cancel);
  };
  const items = [...queue.queue_running.map((i) => row(i, true)), ...queue.queue_pending.map((i) => row(i, false))];
  const clear = el("button", { textContent: "Clear pending", onclick: async () => {
    await api.json("/queue", { method: "POST", body: { clear: true } });
    renderQueue(container, api);
  } });
  container.replaceChildren(el("div", { className: "panel-actions" }, clear),
                            items.length ? el("ul", { className: "queue-list" }, ...items)
                              : el("p", { className: "empty", textContent: "The queue is empty." }));
}

/** Results: one card per history entry, newest first, with thumbnails that open full size and download. */
export async function renderResults(container, api) {
  const history = await api.json("/history?max_items=50");
  const entries = Object.entries(history).reverse();
  const cards = entries.map(([promptId, entry]) => {
    const status = entry.status?.status_str ?? "unknown";
    const images = Object.values(entry.outputs ?? {}).flatMap((o) => o.images ?? []);
    const thumbs = images.map((image) => {
      const full = api.viewUrl(image);
      return el("figure", { className: "result" },
                el("a", { href: full, target: "_blank", title: "open full size" },
                   isVideoName(image.filename)
                     ? el("video", { src: full, className: "thumb", muted: true, loop: true, autoplay: true, controls: true, playsInline: true })
                     : el("img", { src: full, alt: image.filename, className: "thumb" })),
                el("figcaption", {}, el("a", { href: full, download: image.filename, textContent: "download" })));
    });
    const message = (entry.status?.messages ?? []).find(([kind]) => kind === "execution_error")?.[1]?.exception_message;
    const { positive, seed, seconds } = summarize(entry);
    const facts = [["history-seed", seed !== undefined ? `seed ${seed}` : null],
                   ["history-time", seconds !== undefined ? formatDuration(seconds) : null], ["history-status", status]];
    return el("div", { className: `history-entry status-${status}`, dataset: { promptId }, title: `prompt ${promptId}` },
              positive !== undefined ? el("div", { className: "history-prompt", textContent: positive || "(empty prompt)" }) : null,
              el("div", { className: "history-head" },
                 ...facts.filter(([, text]) => text).map(([className, textContent]) => el("span", { className, textContent }))),
              message ? el("div", { className: "error-text", textContent: message }) : null,
              el("div", { className: "thumbs" }, ...thumbs));
  });
  container.replaceChildren(cards.length ? el("div", {}, ...cards)
    : el("p", { className: "empty", textContent: "No results yet." }));
}

/** Server-side workflows: list with open and delete; save and save-as act on the app's current name. */
export async function renderWorkflows(container, api, app) {
  const names = await api.json("/workflows");
  const items = names.map((name) => el("li", { dataset: { name } },
    el("button", { className: "open", textContent: name, onclick: () => app.openSaved(name) }),
    el("button", { className: "delete", textContent: "Delete", title: `delete ${name}`, onclick: async () => {
      if (!confirm(`Delete ${name}?`)) return;
      await api.json(`/workflows/${encodeURIComponent(name)}`, { method: "DELETE" });
      renderWorkflows(container, api, app);
    } })));
  const save = el("button", { textContent: "Save", className: "save", onclick: () => app.saveToServer(false) });
  const saveAs = el("button", { textContent: "Save as…", className: "save-as", onclick: () => app.saveToServer(true) });
  container.replaceChildren(el("div", { className: "panel-actions" }, save, saveAs),
                            items.length ? el("ul", { className: "workflow-list" }, ...items)
                              : el("p", { className: "empty", textContent: "No saved workflows." }));
}

/** The shipped workflows (the server's /templates/index.json): thumbnail, title, description; a click opens one. */
export async function renderTemplates(container, api, app) {
  const index = await api.json("/templates/index.json");
  const cards = index.flatMap((category) => (category.templates ?? []).map((template) => {
    const thumbnail = template.mediaSubtype ? `/templates/${encodeURIComponent(template.name)}-1.${template.mediaSubtype}` : null;
    return el("button", { className: "template", dataset: { name: template.name }, title: `open ${template.name}`,
                          onclick: () => app.openTemplate(template.name, template.title || template.name)
                            .catch((error) => app.toast(error.message)) },
              thumbnail ? el("img", { className: "template-thumb", src: thumbnail, alt: "", loading: "lazy" }) : null,
              el("span", { className: "template-title", textContent: template.title || template.name }),
              el("span", { className: "template-description", textContent: template.description ?? "" }));
  }));
  container.replaceChildren(cards.length ? el("div", { className: "template-list" }, ...cards)
    : el("p", { className: "empty", textContent: "No shipped workflows." }));
}
