// DrywallQA live dashboard: one EventSource to the server; everything is rendered with textContent (payload
// strings come from devices on the network and are never inserted as HTML).
"use strict";

const model = {
  devices: new Map(), alerts: new Map(), broker: null, classes: [], counts: null, streamUp: false, streamDownSince: null,
  deviceTimeout: 45, clockOffset: 0,  // clockOffset: server clock minus this browser's, from the last full state
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "-");
function ago(t) {
  if (!t) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? `${s.toFixed(0)} s ago` : `${span(s)} ago`;
}
const agoServer = (t) => ago(t - model.clockOffset);  // a time on the server's clock, told on this browser's
const pct = (x) => `${(100 * x).toFixed(2)} %`;
function span(s) {  // a length of time, rounded for reading: "12 min", "3.5 h", "40 days", "56 years"
  s = Math.abs(s);
  if (s < 3600) return `${(s / 60).toFixed(0)} min`;
  if (s < 2 * 86400) return `${(s / 3600).toFixed(1)} h`;
  if (s < 365.25 * 86400) return `${(s / 86400).toFixed(0)} days`;
  return `${(s / (365.25 * 86400)).toFixed(0)} years`;
}

// ---- broker / stream indicators --------------------------------------------------------------------
function renderLinks() {
  const b = model.broker;
  const brokerPill = document.getElementById("broker-status");
  const streamPill = document.getElementById("stream-status");
  streamPill.dataset.state = model.streamUp ? "connected" : "disconnected";
  streamPill.textContent = model.streamUp ? "live: connected" : "live: disconnected";
  if (b) {
    brokerPill.dataset.state = b.connected ? "connected" : "disconnected";
    brokerPill.textContent = b.connected ? "broker: connected" : "broker: disconnected";
    brokerPill.title = `${b.url} - ${b.detail}`;
  }
  const banner = document.getElementById("banner");
  const msgs = [];
  if (!model.streamUp) {
    msgs.push(`Lost the live connection to the dashboard server${model.streamDownSince ? " " + ago(model.streamDownSince) : ""}; retrying. Figures below may be out of date.`);
  } else if (b && !b.connected) {
    msgs.push(`Dashboard server disconnected from the MQTT broker ${b.url} since ${fmtTime(b.since)} (${b.detail}). Device states below are the last known ones.`);
  }
  if (b && b.alerts_held) msgs.push(`${b.alerts_held} alert(s) received but not saved yet: ${b.held_detail}`);
  banner.hidden = msgs.length === 0;
  banner.textContent = msgs.join(" ");
  const inv = document.getElementById("invalid");
  const notes = [];
  if (b && b.invalid_messages) notes.push(`${b.invalid_messages} invalid MQTT message(s) ignored; last: ${b.last_invalid}`);
  if (b && b.alerts_lost) notes.push(`${b.alerts_lost} alert(s) lost (the store could not be written); last: ${b.last_lost}`);
  if (b && b.devices_dropped) notes.push(`${b.devices_dropped} device(s) dropped from the list to stay within ${b.max_devices} (--max-devices; the longest-silent go first, offline ones before others)`);
  inv.textContent = notes.join(" | ");
  document.body.dataset.stale = (!model.streamUp || (b && !b.connected)) ? "1" : "0";
}

// ---- render scheduling: a burst of messages (a reconnecting device replaying its spool) costs one render per
// 100 ms, not one per message ----------------------------------------------------------------------------
const pending = new Set();
let flushTimer = null;
function schedule(part) {
  pending.add(part);
  if (flushTimer === null) flushTimer = setTimeout(flush, 100);
}
function flush() {
  flushTimer = null;
  const parts = [...pending];
  pending.clear();
  if (parts.includes("classes")) renderClassFilter();
  if (parts.includes("devices")) renderDevices();
  if (parts.includes("alerts")) renderAlerts();
}

// ---- devices -------------------------------------------------------------------------------------------
const serverNow = () => Date.now() / 1000 + model.clockOffset;

// "silent": the device says it is online (or paused) but nothing has come from it for device_timeout_s; its
// link or power may be gone and the broker has not noticed yet, or it never set a last will.
function deviceState(d) {
  const state = d.status ? d.status.state : "unknown";
  const heard = model.broker && model.broker.connected;  // while the dashboard itself is cut off, it hears nobody
  if (heard && state !== "offline" && d.last_seen && serverNow() - d.last_seen > model.deviceTimeout) return "silent";
  return state;
}

function figuresTable(det) {
  const table = el("table", { class: "figures" },
    el("thead", {}, el("tr", {}, ...["class", "area", "regions", "crack length", "confidence"].map((h) => el("th", { text: h })))));
  const body = el("tbody");
  for (const r of det.results) {
    body.append(el("tr", { "data-class": r.class_name },
      el("td", { text: r.class_name, class: `cls cls-${r.class_name}` }),
      el("td", { class: "area", text: pct(r.area_fraction) }),
      el("td", { class: "regions", text: String(r.region_count) }),
      el("td", { class: "length", text: r.class_name === "crack" || r.skeleton_length_px > 0 ? `${r.skeleton_length_px.toFixed(0)} px` : "-" }),
      el("td", { text: r.mean_confidence.toFixed(2) })));
  }
  table.append(body);
  return table;
}

// The device's clock, by its latest live message, is off the dashboard's by more than the store believes
// (`clock_off`): most often a board without a real-time clock or network time, booted in 1970.
function clockNote(d) {
  if (!d.clock_off) return null;
  const off = `device clock ${span(d.clock_offset_s)} ${d.clock_offset_s > 0 ? "ahead of" : "behind"} the dashboard's`;
  const listed = d.clock_alerts_by_receipt ? "alerts are listed by the time received" : "its alerts are listed by its own, too early, times";
  return `${off}: ${listed}; set up network time on the device`;
}

function renderDevice(d) {
  const st = d.status;
  // A device time told as an age on the dashboard's clock: one from a clock that is off (1970) is moved by that
  // offset, or the card would say "498866 h ago" of a status just received.
  const sinceSent = (t) => agoServer(d.clock_off ? t - d.clock_offset_s : t);
  const state = deviceState(d);
  const card = el("article", { class: "device", "data-device": d.device_id, "data-state": state });
  const badge = el("span", { class: `state state-${state}`, text: state,
    title: state === "silent" ? `last message ${agoServer(d.last_seen)}` : undefined });
  const stale = model.broker && !model.broker.connected;
  card.append(el("h3", {}, el("span", { class: "name", text: d.device_id }),
    el("span", {}, stale ? el("span", { class: "last-known", text: "last known: " }) : null, badge)));
  if (st && st.last_will && st.offline_since_before) {
    // It went offline while this dashboard was not connected: when is not known, only that it was before then.
    card.append(el("p", { class: "meta warn lost", text: `connection lost without a clean stop (last will) while this dashboard was not connected: offline since before ${fmtTime(st.offline_since_before)}; latest status ${fmtTime(st.timestamp)}; figures are its last known ones` }));
  } else if (st && st.last_will) {
    card.append(el("p", { class: "meta warn lost", text: `connection lost without a clean stop (last will) ${sinceSent(st.timestamp)}; figures are its last known ones` }));
  } else if (state === "silent") {
    card.append(el("p", { class: "meta warn lost", text: `nothing heard since ${fmtTime(d.last_seen)}` }));
  }
  if (st) {
    const bits = [
      st.source ? `source ${st.source}${st.source_state ? " (" + st.source_state + ")" : ""}` : "",
      st.model ? `model ${st.model}` : "",
      `${st.fps.toFixed(1)} fps`,
      `${st.frames_processed} frames` + (st.frames_dropped ? `, ${st.frames_dropped} dropped` : "") + (st.frames_corrupt ? `, ${st.frames_corrupt} corrupt` : ""),
      st.spooled_alerts ? `${st.spooled_alerts} alerts spooled` : "",
      `status ${sinceSent(st.timestamp)}`,
    ].filter(Boolean);
    card.append(el("p", { class: "meta", text: bits.join(" | ") }));
    if (st.prompts && st.prompts.length) card.append(el("p", { class: "meta", text: "prompts: " + st.prompts.join(", ") }));
    if (st.last_error) card.append(el("p", { class: "meta warn", text: "last error: " + st.last_error }));
  }
  const clock = clockNote(d);
  if (clock) card.append(el("p", { class: "meta warn clock-off", text: clock }));
  if (d.frame) {
    card.append(el("a", { href: d.frame.url, target: "_blank", rel: "noopener" },
      el("img", { class: "frame", src: d.frame.url, alt: `latest frame from ${d.device_id}` })));
    card.append(el("p", { class: "meta", text: `frame from ${d.frame.source}, ${fmtTime(d.frame.timestamp)}` }));
  } else {
    card.append(el("p", { class: "muted", text: "no frame yet (enable previews on the device or request a snapshot)" }));
  }
  card.append(el("button", { class: "snapshot", text: "request snapshot", disabled: state === "offline",
    title: state === "offline" ? "the device is offline: a request would not reach it" : undefined,
    onclick: () => requestSnapshot(d.device_id) }));
  if (state === "offline" || state === "silent") {
    card.append(el("button", { class: "forget", text: "forget device", title: "remove it from this page and clear its retained status on the broker (it comes back if it reports again)", onclick: () => forgetDevice(d.device_id) }));
  }
  const det = d.detection;
  if (det) {
    card.append(el("p", { class: "meta", text: `frame #${det.frame_id} ${det.width}x${det.height}, ${det.inference_ms.toFixed(1)} ms inference, ${sinceSent(det.timestamp)}` }));
    card.append(figuresTable(det));
  }
  return card;
}

let deviceSignature = "";
function renderDevices() {
  const box = document.getElementById("devices");
  const ids = [...model.devices.keys()].sort();
  deviceSignature = ids.map((id) => deviceState(model.devices.get(id))).join(",");
  box.replaceChildren(...ids.map((id) => renderDevice(model.devices.get(id))));
  document.getElementById("no-devices").hidden = ids.length > 0;
}

// A device falls silent without any message: look every few seconds whether a badge must change.
function checkSilence() {
  const ids = [...model.devices.keys()].sort();
  if (ids.map((id) => deviceState(model.devices.get(id))).join(",") !== deviceSignature) schedule("devices");
}

async function forgetDevice(deviceId) {
  if (!confirm(`Forget device ${deviceId}? Its card goes away and its retained status is cleared on the broker; it comes back if it reports again.`)) return;
  const res = await fetch(`/api/devices/${encodeURIComponent(deviceId)}/forget`, { method: "POST", headers: { "X-DrywallQA": "1" } });
  if (!res.ok) alert(`Could not forget the device: ${(await res.json()).error || res.status}`);
}

// ---- alerts --------------------------------------------------------------------------------------------
// The page holds the newest alerts that match the filter and pages older ones in from the server on request;
// the store keeps up to --max-alerts. Totals come from the server.
//
// Alerts are ordered by the server's `sort_time`: the device's timestamp, or the time received when the device's
// clock is implausible (`device_clock_off`: 1970 after a boot without network time, or years ahead).
//
// Invariant, so that paging never skips an alert: while older ones exist on the server (`olderAvailable`),
// `model.alerts` holds exactly the matching alerts at or above `cursor` (the oldest one held), and "show
// older" asks for the ones below it. An alert that arrives below the cursor (a device replaying its spool)
// is left to paging. While a load is in flight everything is taken; the merge re-establishes the invariant.
const ALERT_PAGE = 100;
const alertView = { limit: ALERT_PAGE, olderAvailable: false, cursor: null, loading: false, generation: 0 };

function alertFilter() {
  return { cls: document.getElementById("alert-class").value, showAcked: document.getElementById("show-acked").checked };
}
const matches = (a, f) => (!f.cls || a.class_name === f.cls) && (f.showAcked || !a.acked);
const newerFirst = (x, y) => (y.sort_time - x.sort_time) || (y.event_id < x.event_id ? -1 : y.event_id > x.event_id ? 1 : 0);
const olderThan = (a, b) => newerFirst(a, b) > 0;

// The CSV download of what the filter shows (every page the store keeps), for the link beside the filters.
function csvHref(f) {
  const q = new URLSearchParams({ include_acked: f.showAcked ? "1" : "0" });
  if (f.cls) q.set("class", f.cls);
  return `/api/alerts.csv?${q}`;
}
const followFilters = () => { document.getElementById("download-alerts").href = csvHref(alertFilter()); };

function alertsQuery(f, before) {
  const q = new URLSearchParams({ limit: String(ALERT_PAGE + 1), include_acked: f.showAcked ? "1" : "0" });
  if (f.cls) q.set("class", f.cls);
  if (before) { q.set("before", String(before.sort_time)); q.set("before_id", before.event_id); }
  return `/api/alerts?${q}`;
}

// Keep at most `limit` alerts: drop the oldest and move the cursor up to the oldest kept.
function trimAlerts() {
  if (model.alerts.size <= alertView.limit) return;
  const held = [...model.alerts.values()].sort(newerFirst);
  for (const old of held.slice(alertView.limit)) model.alerts.delete(old.event_id);
  alertView.cursor = held[alertView.limit - 1];
  alertView.olderAvailable = true;
}

// Fetch a page from the server: the newest (reset) or the one below the cursor.
async function loadAlerts(reset) {
  const f = alertFilter();
  const gen = reset ? ++alertView.generation : alertView.generation;
  if (!reset && (alertView.loading || !alertView.cursor)) return;
  if (reset) {
    model.alerts = new Map();
    alertView.limit = ALERT_PAGE;
    alertView.cursor = null;
    alertView.olderAvailable = false;
  }
  const before = reset ? null : alertView.cursor;
  alertView.loading = true;
  schedule("alerts");
  try {
    const res = await fetch(alertsQuery(f, before), { cache: "no-store" });
    if (res.status === 401) { window.location = "/login"; return; }
    if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
    const page = await res.json();
    if (gen !== alertView.generation) return;  // the filter changed or a resync began; that load owns the list
    const more = page.length > ALERT_PAGE;
    const got = page.slice(0, ALERT_PAGE);
    for (const a of got) if (!model.alerts.has(a.event_id)) model.alerts.set(a.event_id, a);
    if (more) {  // alerts below this page stay on the server; anything held below it is left to paging too
      alertView.cursor = got[got.length - 1];
      for (const a of [...model.alerts.values()]) if (olderThan(a, alertView.cursor)) model.alerts.delete(a.event_id);
    }
    alertView.olderAvailable = more;
    if (!more) alertView.cursor = null;
    if (!reset) alertView.limit += ALERT_PAGE;
    trimAlerts();
    document.getElementById("alerts-error").textContent = "";
  } catch (e) {
    document.getElementById("alerts-error").textContent = `Could not load alerts: ${e.message}`;
  } finally {
    if (gen === alertView.generation) alertView.loading = false;
    schedule("alerts");
  }
}

function takeAlert(a) {
  if (!matches(a, alertFilter())) { model.alerts.delete(a.event_id); return; }
  if (!alertView.loading && alertView.olderAvailable && alertView.cursor && olderThan(a, alertView.cursor)) {
    model.alerts.delete(a.event_id);  // below the cursor: "show older" brings it, in its place
    return;
  }
  model.alerts.set(a.event_id, a);
  if (!alertView.loading) trimAlerts();
}

async function setAck(eventId, ack) {
  const res = await fetch(`/api/alerts/${encodeURIComponent(eventId)}/${ack ? "ack" : "unack"}`, {
    method: "POST", headers: { "X-DrywallQA": "1", "Content-Type": "application/json" }, body: "{}",
  });
  if (res.ok) { takeAlert(await res.json()); schedule("alerts"); return; }
  if (res.status === 404) { model.alerts.delete(eventId); schedule("alerts"); }  // dropped from the store since
  alert(`Could not update the alert: ${await errorText(res)}`);
}

// The server's {"error": ...} message, else the HTTP status.
async function errorText(res) {
  try { return (await res.json()).error || `HTTP ${res.status}`; } catch (e) { return `HTTP ${res.status}`; }
}

async function requestSnapshot(deviceId) {
  const res = await fetch(`/api/devices/${encodeURIComponent(deviceId)}/snapshot`, { method: "POST", headers: { "X-DrywallQA": "1" } });
  if (!res.ok) alert(`Could not request a snapshot: ${(await res.json()).error || res.status}`);
}

function renderAlert(a) {
  const li = el("li", { class: "alert" + (a.acked ? " acked" : ""), "data-event-id": a.event_id, "data-class": a.class_name });
  if (a.snapshot_url) {
    li.append(el("a", { href: a.snapshot_url, target: "_blank", rel: "noopener", class: "snap", title: "open snapshot" },
      el("img", { src: a.snapshot_url, alt: `snapshot of alert ${a.event_id}`, loading: "lazy" })));
  } else {
    li.append(el("span", { class: "snap muted", text: "no snapshot" }));
  }
  const figures = [`area ${pct(a.area_fraction)}`, a.skeleton_length_px ? `length ${a.skeleton_length_px.toFixed(0)} px` : "",
    `${a.region_count} regions`, `conf ${a.mean_confidence.toFixed(2)}`, `held ${a.persisted_frames} frames`].filter(Boolean);
  li.append(el("div", { class: "body" },
    el("div", {}, el("b", { class: `cls cls-${a.class_name}`, text: a.class_name }), " ",
      el("span", { class: "device-id", text: a.device_id }), " ", el("span", { class: "rule", text: a.rule })),
    el("div", { class: "meta", text: `${fmtTime(a.timestamp)} | frame #${a.frame_id} | prompt "${a.prompt}"` }),
    a.device_clock_off ? el("div", { class: "meta warn clock-off", text: `device clock wrong: listed by the time received, ${fmtTime(a.sort_time)}` }) : null,
    el("div", { class: "figures-line", text: figures.join(" | ") }),
    a.acked ? el("div", { class: "meta ack-info", text: `acknowledged ${fmtTime(a.ack.acked_at)}` }) : null));
  li.append(el("button", { class: "ack", text: a.acked ? "undo" : "acknowledge", onclick: () => setAck(a.event_id, !a.acked) }));
  return li;
}

// Rendered items are reused while the alert is unchanged, so a render touches only what changed.
let alertNodes = new Map();
function renderAlerts() {
  const shown = [...model.alerts.values()].sort(newerFirst);
  const nodes = new Map();
  const items = shown.map((a) => {
    const key = `${a.acked ? 1 : 0}`;
    const old = alertNodes.get(a.event_id);
    const node = old && old.key === key ? old.node : renderAlert(a);
    nodes.set(a.event_id, { key, node });
    return node;
  });
  alertNodes = nodes;
  document.getElementById("alerts").replaceChildren(...items);
  document.getElementById("no-alerts").hidden = shown.length > 0 || alertView.loading;
  const older = document.getElementById("older-alerts");
  older.hidden = !alertView.olderAvailable;
  older.disabled = alertView.loading;
  const c = model.counts;
  document.getElementById("alert-count").textContent = c
    ? `(${c.open} open, ${c.acknowledged} acknowledged; showing ${shown.length})` : "";
}

function renderClassFilter() {
  const sel = document.getElementById("alert-class");
  const known = new Set([...model.classes, ...[...model.alerts.values()].map((a) => a.class_name)]);
  const current = sel.value;
  sel.replaceChildren(el("option", { value: "", text: "all" }), ...[...known].sort().map((c) => el("option", { value: c, text: c })));
  sel.value = known.has(current) ? current : "";
}

// ---- stream --------------------------------------------------------------------------------------------
let source = null;
function connect() {
  source = new EventSource("/events");
  source.onopen = () => { model.streamUp = true; model.streamDownSince = null; renderLinks(); };
  source.onerror = async () => {
    if (model.streamUp) model.streamDownSince = Date.now() / 1000;
    model.streamUp = false;
    renderLinks();
    if (source.readyState === EventSource.CLOSED) {  // the browser gave up (e.g. HTTP error): retry ourselves
      source.close();
      try {
        const r = await fetch("/api/state", { cache: "no-store" });
        if (r.status === 401) { window.location = "/login"; return; }
      } catch (e) { /* server down: keep retrying */ }
      setTimeout(connect, 2000);
    }
  };
  source.addEventListener("state", (ev) => {
    const s = JSON.parse(ev.data);
    model.devices = new Map(s.devices.map((d) => [d.device_id, d]));
    model.broker = s.broker;
    model.classes = s.classes;
    model.counts = s.alert_counts;
    model.deviceTimeout = s.device_timeout_s;
    model.clockOffset = s.server_time - Date.now() / 1000;
    document.getElementById("logout").hidden = !s.auth;
    model.streamUp = true;
    renderLinks();
    schedule("classes"); schedule("devices");
    loadAlerts(true);  // after a resync the page may have missed alerts: take the filter's newest page afresh
  });
  source.addEventListener("device", (ev) => {
    const d = JSON.parse(ev.data);
    model.devices.set(d.device_id, d);
    schedule("devices");
  });
  source.addEventListener("device_removed", (ev) => {
    model.devices.delete(JSON.parse(ev.data).device_id);
    schedule("devices");
  });
  source.addEventListener("alert", (ev) => {
    const a = JSON.parse(ev.data);
    if (!a.event_id) return;
    if (!model.classes.includes(a.class_name)) { model.classes.push(a.class_name); schedule("classes"); }
    takeAlert(a);
    schedule("alerts");
  });
  source.addEventListener("alert_counts", (ev) => {
    model.counts = JSON.parse(ev.data);
    schedule("alerts");
  });
  source.addEventListener("broker", (ev) => {
    const wasConnected = model.broker && model.broker.connected;
    model.broker = JSON.parse(ev.data);
    renderLinks();
    if (wasConnected !== model.broker.connected) schedule("devices");  // toggles the "last known" labels
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("alert-class").addEventListener("change", () => { followFilters(); loadAlerts(true); });
  document.getElementById("show-acked").addEventListener("change", () => { followFilters(); loadAlerts(true); });
  document.getElementById("older-alerts").addEventListener("click", () => loadAlerts(false));
  renderLinks();
  connect();
  setInterval(() => { renderLinks(); checkSilence(); }, 5000);
});
