/**
 * Files in and out: workflow JSON downloads, the text chunks of a PNG written by SaveImage (its `workflow` and
 * `prompt`), and a layout for API-format workflows (which carry no positions) so they can be opened on the canvas.
 */

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

/** The tEXt / iTXt (uncompressed) chunks of a PNG as {keyword: text}; throws if the bytes are not a PNG. */
export function pngTextChunks(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!PNG_SIGNATURE.every((b, i) => bytes[i] === b)) throw new Error("not a PNG file");
  const view = new DataView(buffer);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const chunks = {};
  let offset = 8;
  while (offset + 12 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "tEXt") {
      const zero = data.indexOf(0);
      chunks[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(zero + 1));
    } else if (type === "iTXt") {
      const zero = data.indexOf(0);
      const compressed = data[zero + 1];
      let rest = zero + 3;
      rest = data.indexOf(0, rest) + 1; // language tag
      rest = data.indexOf(0, rest) + 1; // translated keyword
      if (!compressed) chunks[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(rest));
    } else if (type === "IEND") {
      break;
    }
    offset += 12 + length;
  }
  return chunks;
}

/** Offer `data` to the user as a file download. */
export function download(filename, data, type = "application/json") {
  const blob = data instanceof Blob ? data : new Blob([data], { type });
  const url = URL.createObjectURL(blob);
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Columns by depth (longest path from a source), rows in id order: positions for an API-format graph. */
export function layoutApiGraph(prompt) {
  const depth = {};
  const visit = (id, seen = new Set()) => {
    if (id in depth) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    let d = 0;
    for (const value of Object.values(prompt[id]?.inputs ?? {})) {
      if (Array.isArray(value) && value.length === 2 && typeof value[0] === "string" && value[0] in prompt) {
        d = Math.max(d, visit(value[0], seen) + 1);
      }
    }
    depth[id] = d;
    return d;
  };
  const columns = {};
  for (const id of Object.keys(prompt).sort((a, b) => Number(a) - Number(b) || a.localeCompare(b))) {
    const d = visit(id);
    (columns[d] ??= []).push(id);
  }
  const positions = {};
  for (const [d, ids] of Object.entries(columns)) {
    ids.forEach((id, row) => { positions[id] = [40 + Number(d) * 360, 40 + row * 260]; });
  }
  return positions;
}
