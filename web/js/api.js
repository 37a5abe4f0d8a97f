/**
 * The server, seen from the page: JSON over HTTP (with the bearer token when the server wants one) and the
 * WebSocket of events and preview frames. The token is asked for once, on the first 401, and kept in
 * sessionStorage for the rest of the session; the client id is kept there too, so a reload gets its events back.
 */

const TOKEN_KEY = "latentloom.token";
const CLIENT_KEY = "latentloom.clientId";

export class HttpError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** Decode a binary WebSocket frame: a preview image, with its node when the server sent metadata. */
export function decodePreviewFrame(buffer) {
  const view = new DataView(buffer);
  const event = view.getUint32(0);
  if (event === 1) {
    const mime = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
    return { blob: new Blob([buffer.slice(8)], { type: mime }), meta: {} };
  }
  if (event === 4) {
    const length = view.getUint32(4);
    const meta = JSON.parse(new TextDecoder().decode(buffer.slice(8, 8 + length)));
    return { blob: new Blob([buffer.slice(8 + length)], { type: meta.image_type ?? "image/jpeg" }), meta };
  }
  return null;
}

export class Api extends EventTarget {
  /** askToken: async () => string | null, called when the server answers 401. */
  constructor(askToken) {
    super();
    this.askToken = askToken;
    this.token = sessionStorage.getItem(TOKEN_KEY) || "";
    this.clientId = sessionStorage.getItem(CLIENT_KEY) || crypto.randomUUID().replaceAll("-", "");
    sessionStorage.setItem(CLIENT_KEY, this.clientId);
    this.socket = null;
  }

  headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : extra;
  }

  /** fetch with auth; on 401 asks for a token once per failure and retries. Returns the Response. */
  async fetch(path, options = {}) {
    for (;;) {
      const response = await fetch(path, { ...options, headers: this.headers(options.headers ?? {}) });
      if (response.status !== 401) return response;
      const token = await this.askToken(this.token ? "That token was refused." : "");
      if (token === null) return response;
      this.setToken(token);
    }
  }

  setToken(token) {
    this.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    if (this.socket) this.socket.close();
  }

  /** JSON in and out; throws HttpError (with the server's JSON body) for a non-2xx answer. */
  async json(path, { method = "GET", body } = {}) {
    const options = { method };
    if (body !== undefined) {
      options.body = JSON.stringify(body);
      options.headers = { "Content-Type": "application/json" };
    }
    const response = await this.fetch(path, options);
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { error: { message: text } };
    }
    if (!response.ok) throw new HttpError(response.status, data);
    return data;
  }

  /** The URL of a stored image, usable in <img src> (the token travels as a query parameter). */
  viewUrl({ filename, subfolder = "", type = "output" }, extra = {}) {
    const params = new URLSearchParams({ filename, subfolder, type, ...extra });
    if (this.token) params.set("token", this.token);
    return `/view?${params}`;
  }

  async uploadImage(file, overwrite = false) {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("type", "input");
    if (overwrite) form.append("overwrite", "true");
    const response = await this.fetch("/upload/image", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) throw new HttpError(response.status, data);
    return data;
  }

  /** Open the event socket; reconnects after a drop. Events are dispatched as CustomEvent(type, {detail}). */
  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const params = new URLSearchParams({ clientId: this.clientId });
    if (this.token) params.set("token", this.token);
    const socket = new WebSocket(`${scheme}://${location.host}/ws?${params}`);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("open", () => {
      socket.send(JSON.stringify({ type: "feature_flags", data: { supports_preview_metadata: true } }));
      this.dispatchEvent(new CustomEvent("reconnected"));
    });
    socket.addEventListener("message", (message) => {
      if (message.data instanceof ArrayBuffer) {
        const preview = decodePreviewFrame(message.data);
        if (preview) this.dispatchEvent(new CustomEvent("b_preview", { detail: preview }));
        return;
      }
      const { type, data } = JSON.parse(message.data);
      this.dispatchEvent(new CustomEvent(type, { detail: data }));
    });
    socket.addEventListener("close", () => {
      if (this.socket === socket) setTimeout(() => this.connect(), 1000);
    });
  }
}
