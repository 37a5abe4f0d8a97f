/**
 * The DOM around the canvas: the node palette (searchable, grouped by category), the queue panel, the results
 * panel (this session's and earlier runs from /history) and the server-side workflows panel.
 */

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
      const group = el("details", { className: "palette-group", open: Boolean(query) },
                       el("summary", { textContent: category }));
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
              el("span", { textContent: `${running ? "▶ running" : "⏳ pending"} #${number} ${promptId.slice(0, 8)}` }),
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
                   el("img", { src: full, alt: image.filename, className: "thumb" })),
                el("figcaption", {}, el("a", { href: full, download: image.filename, textContent: "download" })));
    });
    const message = (entry.status?.messages ?? []).find(([kind]) => kind === "execution_error")?.[1]?.exception_message;
    return el("div", { className: `history-entry status-${status}`, dataset: { promptId } },
              el("div", { className: "history-head", textContent: `${promptId.slice(0, 8)} — ${status}` }),
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
    el("button", { className: "delete", textContent: "✕", title: `delete ${name}`, onclick: async () => {
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
