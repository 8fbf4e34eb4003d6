// The live page of dhub batches: plain JavaScript as ES modules, no build step, no
// dependencies. This one is the entry: the router, sign-in and sign-out; the views are
// pipelines-view.js, batches-view.js and batch-view.js, over api.js (calls), stream.js (the
// push streams), session.js (the token), header.js, progress.js and dom.js.
//
// Views (in the URL fragment): #/ pipelines, #/p/<pipeline> its batches, #/p/<pipeline>/<batch>
// one batch. The token is typed into the login form or given once as #token=<token>; either
// way it is kept in sessionStorage (this tab only) and the fragment is wiped from the location
// and the history at once. Every API call carries it in the Authorization header: the streams
// use fetch() rather than EventSource, which cannot set headers, so the token is never in a URL.
import { api } from "./api.js";
import { batchView } from "./batch-view.js";
import { batchesView } from "./batches-view.js";
import { $, el } from "./dom.js";
import { crumbs, setLive } from "./header.js";
import { pipelinesView } from "./pipelines-view.js";
import {
  carriable, dropToken, keepToken, onSignOut, SignedOut, takeFragmentToken, token, UNCARRIABLE,
} from "./session.js";

function loginView(message) {
  crumbs();
  setLive("none");
  $("logout").hidden = true;
  const view = $("login-view").content.cloneNode(true);
  const form = view.querySelector("#login-form");
  const error = view.querySelector("#login-error");
  if (message) { error.textContent = message; error.hidden = false; }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = form.elements.token.value.trim();
    if (!value) return;
    if (!carriable(value)) { error.textContent = UNCARRIABLE; error.hidden = false; return; }
    keepToken(value);
    try {
      await api("GET", "/pipelines/");  // proves the token before leaving the form
    } catch (err) {
      // Not proven: not kept, or the next load would count as signed in with it.
      dropToken();
      if (!(err instanceof SignedOut)) { error.textContent = String(err.message); error.hidden = false; }
      return;
    }
    render();
  });
  $("main").replaceChildren(view);
  $("token").focus();
  return () => {};
}

let leave = () => {};

function render(message) {
  leave();
  leave = () => {};
  if (!token()) { leave = loginView(message); return; }
  $("logout").hidden = false;
  const match = /^#\/p\/([^/]+)(?:\/([^/]+))?\/?$/.exec(location.hash);
  try {
    if (!match) leave = pipelinesView();
    else if (!match[2]) leave = batchesView(decodeURIComponent(match[1]));
    else leave = batchView(decodeURIComponent(match[1]), decodeURIComponent(match[2]));
  } catch (err) {
    // The last view's stream is closed: left on screen, it would say "live" and never move.
    crumbs();
    setLive("none");
    $("main").replaceChildren(el("p", { class: "card empty error", id: "broken" },
      `This page's address cannot be read (${err.message || err}). `,
      el("a", { href: "#/" }, "Back to the pipelines")));
  }
}

function start() {
  onSignOut(render);
  const refused = takeFragmentToken();
  $("logout").addEventListener("click", () => {
    dropToken();
    history.replaceState(null, "", location.pathname + location.search);  // no hashchange
    render("Signed out.");
  });
  window.addEventListener("hashchange", () => {
    render(location.hash.startsWith("#token=") ? takeFragmentToken() : undefined);
  });
  render(refused);
}

start();
