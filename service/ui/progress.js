// What a step's progress is said to be, in the batches list and on a batch's page alike:
// its records, its percent and its partitions' bars.
import { num } from "./dom.js";

// A step's records over its partitions, as "1,234 records". Each offset is at most
// 2**53 - 1 (exact as a number), their sum need not be: summed as a BigInt.
// A value that is no finite number counts as 0: BigInt() throws on NaN and Infinity.
const whole = (n) => {
  const x = Math.trunc(Number(n));
  return Number.isFinite(x) ? x : 0;
};
export const records = (offsets) => {
  const done = Object.values(offsets || {}).reduce((sum, n) => sum + BigInt(whole(n)), 0n);
  return `${num(done)} ${done === 1n ? "record" : "records"}`;
};

// A step's percent as shown, `digits` decimals, or null without one. Rounded down: 99.5 is
// not "100". The API's has one decimal, so 9,996 of 10,000 records come as 100.0: while a
// partition's offset is short of its total, 100 is not said.
export function percentText(step, digits) {
  const percent = step.progress && step.progress.percent;
  if (typeof percent !== "number") return null;
  const scale = 10 ** digits;
  let shown = Math.min(100, Math.floor(percent * scale + 1e-6) / scale);
  const offsets = step.offsets || {};
  const short = Object.entries(step.totals || {}).some(([part, total]) => (offsets[part] || 0) < total);
  if (short && shown >= 100) shown = 100 - 1 / scale;
  return `${shown.toFixed(digits)}%`;
}

// The step a batch is at (the running one, else the last one that started) and its records.
export function progressText(batch) {
  const steps = Object.entries((batch.state && batch.state.steps) || {});
  const started = steps.filter(([, s]) => s.state !== "none" && s.state !== "pending");
  const current = steps.find(([, s]) => s.state === "running") || started.at(-1);
  if (!current) return "";
  const [name, step] = current;
  const percent = percentText(step, 0) ? ` (${percentText(step, 0)})` : "";
  return `${name}: ${records(step.offsets)}${percent}`;
}

export function partitionBar(step, partition, offset, moving) {
  const total = step.totals ? step.totals[partition] : undefined;
  // null: how far is unknown (no total). Only a success says the partition was done: a
  // failed step's, or one a stop cut short, is not drawn full (that read as done) nor
  // empty (that read as nothing done), and moves only while the step runs.
  let width = null;
  if (typeof total === "number" && total > 0) width = Math.min(100, (100 * offset) / total);
  else if (step.state === "success") width = 100;
  return { width, total, extent: width !== null ? "" : moving ? " indeterminate" : " unknown" };
}
