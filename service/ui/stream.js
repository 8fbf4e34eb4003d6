// The push streams: Server-Sent Events read with fetch() rather than EventSource, which
// cannot set headers, so the token goes in the Authorization header, never in a URL.
import { API, headers } from "./api.js";
import { flash, setLive } from "./header.js";
import { MAY_NOT_READ, signOut, TOKEN_REFUSED } from "./session.js";

// The server sends a keep-alive comment every 15 s: a stream silent for longer than two of
// them is dead even if the connection looks open (a proxy or a sleeping laptop), so reopen it.
const SILENT_MS = 40000;
const RETRY_MAX_MS = 10000;

// The API's own error (`{"error": {"code", "message"}}`) of an answer, or null for anything
// else (a gateway's page, a body cut short).
async function apiError(response) {
  try {
    const body = await response.json();
    return body && body.error && typeof body.error.code === "string" ? body.error : null;
  } catch {
    return null;
  }
}

// A Server-Sent Events stream read with fetch(), reopened whenever it drops. `final` names
// the events after which the server closes the stream for good (no reconnect then).
// Resuming with Last-Event-ID makes the server send only what is newer than the last id.
export function openStream(path, { onEvent, onOpen, onMissing, onRefused, final = [], resume = false }) {
  let closed = false;
  let left = false;  // closed by its view, which is gone: the header is the next view's
  let controller = null;
  let retryTimer = null;
  let silentTimer = null;
  let attempt = 0;
  let lastId = null;

  const retry = () => {
    if (closed) return;
    setLive("wait");
    const delay = Math.min(RETRY_MAX_MS, 500 * 2 ** attempt++) * (0.75 + Math.random() / 2);
    retryTimer = setTimeout(connect, delay);
  };
  const armSilence = () => {
    clearTimeout(silentTimer);
    silentTimer = setTimeout(() => controller && controller.abort(), SILENT_MS);
  };

  async function connect() {
    if (closed) return;
    controller = new AbortController();
    const extra = { Accept: "text/event-stream" };
    if (resume && lastId) extra["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(API + path, { headers: headers(extra), signal: controller.signal,
                                           cache: "no-store" });
    } catch {
      return retry();
    }
    if (closed) return;
    if (response.status === 401) { signOut(TOKEN_REFUSED); return; }
    // A 4xx is the API's word only in its own JSON error shape: a gateway in front answers
    // with a page of its own while the API is redeployed ("default backend - 404"), which
    // says nothing of the batch, so that is a link failure, retried.
    const error = response.status >= 400 && response.status < 500 ? await apiError(response) : null;
    if (closed) return;
    if (response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status)
        && !error) {
      return retry();
    }
    if (response.status === 404) { setLive("off"); if (onMissing) onMissing(); return; }
    if (response.status === 403) {  // retrying cannot help: the token lacks batches:read
      setLive("off");
      const why = MAY_NOT_READ;
      // Said in the view, which stays: a flash alone went after 12 s, leaving "Loading…".
      if (onRefused) onRefused(why);
      flash(why, "error");
      return;
    }
    // Any other refusal of the request itself (400: an id the API cannot take) is the same
    // on every retry: said, not retried as if the API were away ("reconnecting…" for ever).
    if (response.status >= 400 && response.status < 500 && ![408, 429].includes(response.status)) {
      const message = (error && error.message) || response.statusText;
      setLive("off");
      const why = `The API refused this view's request (${response.status}): ${message}`;
      if (onRefused) onRefused(why);
      flash(why, "error");
      return;
    }
    if (!response.ok || !response.body) return retry();
    attempt = 0;
    setLive("on");
    if (onOpen) onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    armSilence();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        armSilence();
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const message = parseEvent(block);
          if (!message) continue;  // a comment (keep-alive)
          if (message.id !== null) lastId = message.id;
          if (final.includes(message.event)) closed = true;
          onEvent(message.event, message.data);
        }
      }
    } catch {
      // Dropped, cut off by the server, or aborted by the silence timer: reopen below.
    } finally {
      clearTimeout(silentTimer);
    }
    if (left) return;
    if (closed) setLive("done"); else retry();
  }

  setLive("connecting");
  connect();
  return {
    close() {
      closed = true;
      left = true;
      clearTimeout(retryTimer);
      clearTimeout(silentTimer);
      if (controller) controller.abort();
    },
  };
}

function parseEvent(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  let parsed;
  try { parsed = JSON.parse(data.join("\n")); } catch { return null; }
  return { event, id, data: parsed };
}
