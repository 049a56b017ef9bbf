// Drives the dashboard's real app.js (loaded into a Node vm with a minimal DOM) against an in-memory alert
// store that answers /api/alerts like dashboard/store.py (newest first by sort_time, keyset cursor, filters; a
// device timestamp that disagrees stands for a wrong device clock, which the order must ignore). Alerts arrive
// as the SSE stream would deliver them, interleaved at random with page loads, resyncs, acknowledgements and
// late (replayed) alerts. After each trial the page pages down to the end; every open alert must have been
// shown. Prints one JSON line: {"trials": N, "missed": [...]}.
// usage: node alert_paging.js APP_JS [TRIALS] [SEED]
"use strict";
const fs = require("fs");
const vm = require("vm");

const [appJs, trialsArg, seedArg] = process.argv.slice(2);
const TRIALS = Number(trialsArg || 200);
let seed = Number(seedArg || 1) >>> 0;
function random() {  // mulberry32: the same trials on every run
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const rnd = (n) => Math.floor(random() * n);

function element(id) {
  return { id, value: "", checked: false, hidden: false, disabled: false, textContent: "", dataset: {}, children: [],
    replaceChildren(...c) { this.children = c; }, append(...c) { this.children.push(...c); },
    addEventListener() {}, setAttribute() {} };
}
const elements = {};
const document = { getElementById: (id) => (elements[id] ||= element(id)), createElement: element,
  addEventListener() {}, body: { dataset: {} } };

let store = [];
const pending = [];
const newerFirst = (x, y) => (y.sort_time - x.sort_time) || (y.event_id < x.event_id ? -1 : y.event_id > x.event_id ? 1 : 0);
function answer(url) {  // what dashboard/store.py's alerts() returns for this query
  const p = new URL("http://dashboard" + url).searchParams;
  let rows = store.filter((a) => (!p.get("class") || a.class_name === p.get("class")) && (p.get("include_acked") === "1" || !a.acked));
  if (p.get("before")) {
    const t = Number(p.get("before")), id = p.get("before_id");
    rows = rows.filter((a) => a.sort_time < t || (a.sort_time === t && a.event_id < id));
  }
  return rows.sort(newerFirst).slice(0, Number(p.get("limit"))).map((a) => ({ ...a }));
}
function fetch(url) {  // answered when the trial says so, like a slow network
  return new Promise((resolve) => pending.push(() => {
    const body = answer(url);
    resolve({ status: 200, ok: true, json: async () => body, text: async () => "" });
  }));
}
const context = { document, fetch, setTimeout: () => 0, setInterval() {}, clearTimeout() {}, console, URLSearchParams,
  Date, Map, Set, Math, JSON, window: {}, alert() {}, confirm: () => true, EventSource: function () {} };
vm.createContext(context);
vm.runInContext(fs.readFileSync(appJs, "utf8") + "\n;globalThis.__page = { model, alertView, loadAlerts, takeAlert };", context);
const page = context.__page;

const tick = () => new Promise((r) => setImmediate(r));
async function answerAll() {
  while (pending.length) {
    pending.shift()();
    for (let i = 0; i < 5; i++) await tick();
  }
}
let serial = 0;
const newAlert = (sortTime) => ({ event_id: `e${String(serial++).padStart(6, "0")}`, sort_time: sortTime,
  timestamp: random() < 0.2 ? rnd(50) : sortTime, class_name: rnd(4) ? "crack" : "taping", acked: false });

(async () => {
  const missed = [];
  for (let trial = 0; trial < TRIALS; trial++) {
    store = [];
    for (let i = rnd(400); i > 0; i--) store.push(newAlert(1000 + rnd(2000)));
    page.loadAlerts(true);
    for (let step = 0; step < 200; step++) {
      const r = random();
      if (r < 0.5) {  // a live alert, or one replayed from a spool with an old time
        const a = newAlert(random() < 0.2 ? rnd(3000) : 3000 + step);
        store.push(a);
        page.takeAlert({ ...a });
      } else if (r < 0.6) page.loadAlerts(false);  // "show older"
      else if (r < 0.63) page.loadAlerts(true);  // a resync (the stream's queue overflowed)
      else if (r < 0.7) {  // acknowledged (hidden: "show acknowledged" is off)
        const held = [...page.model.alerts.values()];
        if (held.length) {
          const pick = held[rnd(held.length)];
          const a = store.find((x) => x.event_id === pick.event_id);
          if (!a) throw new Error(`held ${pick.event_id} is not in the store (trial ${trial}, step ${step}, ${store.length} stored)`);
          a.acked = true;
          page.takeAlert({ ...a });
        }
      } else if (r < 0.85) await answerAll();
    }
    await answerAll();
    const seen = new Set(page.model.alerts.keys());
    for (let guard = 0; page.alertView.olderAvailable && guard < 500; guard++) {
      page.loadAlerts(false);
      await answerAll();
      for (const id of page.model.alerts.keys()) seen.add(id);
    }
    const never = store.filter((a) => !a.acked && !seen.has(a.event_id)).length;
    if (never) missed.push({ trial, never, open: store.filter((a) => !a.acked).length });
  }
  console.log(JSON.stringify({ trials: TRIALS, missed }));
})();
