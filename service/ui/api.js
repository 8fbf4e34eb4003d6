// Calls to the API. Every one carries the token in the Authorization header (never in a
// URL); a 401 signs the tab out, any other refusal is thrown with its status and code.
import { signOut, SignedOut, token, TOKEN_REFUSED } from "./session.js";

export const API = "/api/v1";

export function headers(extra) {
  return { Authorization: `Bearer ${token()}`, ...extra };
}

export async function api(method, path, extra) {
  const response = await fetch(API + path, {
    method, headers: headers({ Accept: "application/json", ...extra }), cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch { /* an empty or non-JSON body */ }
  if (response.status === 401) throw signOut(TOKEN_REFUSED);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw Object.assign(new Error(`${method} ${path}: ${response.status} ${message}`),
                        { status: response.status, code: body && body.error && body.error.code });
  }
  return body;
}

// Runs a batch: one Idempotency-Key for the click, its retries included, so an answer lost
// on the way back (the batch had started) brings back that batch's id, not an error while
// it runs (and a second batch from the obvious second click). Retried: no answer, a 5xx
// (the key was released), 409 in_progress (the first attempt is still on its way) and an
// answer that is not the API's.
export async function runBatch(path) {
  const key = [...crypto.getRandomValues(new Uint8Array(16))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");  // randomUUID needs https
  for (let attempt = 0; ; attempt++) {
    try {
      return await api("POST", path, { "Idempotency-Key": key });
    } catch (err) {
      // No code: not the API's own error but a gateway's page in front of it (its 404 while
      // the API is redeployed), which says nothing of the batch: asked again, same key.
      const again = !(err instanceof SignedOut) && attempt < 4 &&
        (err.status === undefined || err.status >= 500 || err.code === "in_progress" || !err.code);
      if (!again) throw err;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000 * 2 ** attempt));
  }
}
