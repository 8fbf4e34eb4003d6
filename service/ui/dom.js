// The page's building blocks: nodes, numbers, times and state badges. Nothing here knows the
// API or a view.

export const $ = (id) => document.getElementById(id);
export const num = (n) => (typeof n === "bigint" ? n : Number(n)).toLocaleString("en-US");

export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// In the reader's zone, named: the API's times are UTC, and a bare "11:21 PM" cannot be
// told apart from the same clock time elsewhere (a screenshot passed to a colleague).
export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString(undefined, { timeZoneName: "short" });
}

export function badge(state, extra) {
  return el("span", { class: `badge ${state || "none"}`, dataset: { state: state || "none" } },
    extra || state || "none");
}
