// DrywallQA live dashboard: one EventSource to the server; everything is rendered with textContent (payload
// strings come from devices on the network and are never inserted as HTML).
"use strict";

const model = { devices: new Map(), alerts: new Map(), broker: null, classes: [], streamUp: false, streamDownSince: null };

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
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
const pct = (x) => `${(100 * x).toFixed(2)} %`;

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
  banner.hidden = msgs.length === 0;
  banner.textContent = msgs.join(" ");
  const inv = document.getElementById("invalid");
  inv.textContent = b && b.invalid_messages ? `${b.invalid_messages} invalid MQTT message(s) ignored; last: ${b.last_invalid}` : "";
  document.body.dataset.stale = (!model.streamUp || (b && !b.connected)) ? "1" : "0";
}

// ---- devices -------------------------------------------------------------------------------------------
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

function renderDevice(d) {
  const st = d.status;
  const state = st ? st.state : "unknown";
  const card = el("article", { class: "device", "data-device": d.device_id, "data-state": state });
  const badge = el("span", { class: `state state-${state}`, text: state });
  const stale = model.broker && !model.broker.connected;
  card.append(el("h3", {}, el("span", { class: "name", text: d.device_id }),
    el("span", {}, stale ? el("span", { class: "last-known", text: "last known: " }) : null, badge)));
  if (st) {
    const bits = [
      st.source ? `source ${st.source}${st.source_state ? " (" + st.source_state + ")" : ""}` : "",
      st.model ? `model ${st.model}` : "",
      `${st.fps.toFixed(1)} fps`,
      `${st.frames_processed} frames` + (st.frames_dropped ? `, ${st.frames_dropped} dropped` : "") + (st.frames_corrupt ? `, ${st.frames_corrupt} corrupt` : ""),
      st.spooled_alerts ? `${st.spooled_alerts} alerts spooled` : "",
      `status ${ago(st.timestamp)}`,
    ].filter(Boolean);
    card.append(el("p", { class: "meta", text: bits.join(" | ") }));
    if (st.prompts && st.prompts.length) card.append(el("p", { class: "meta", text: "prompts: " + st.prompts.join(", ") }));
  }
  if (d.frame) {
    card.append(el("a", { href: d.frame.url, target: "_blank", rel: "noopener" },
      el("img", { class: "frame", src: d.frame.url, alt: `latest frame from ${d.device_id}` })));
    card.append(el("p", { class: "meta", text: `frame from ${d.frame.source}, ${fmtTime(d.frame.timestamp)}` }));
  } else {
    card.append(el("p", { class: "muted", text: "no frame yet (enable previews on the device or request a snapshot)" }));
  }
  card.append(el("button", { class: "snapshot", text: "request snapshot", onclick: () => requestSnapshot(d.device_id) }));
  const det = d.detection;
  if (det) {
    card.append(el("p", { class: "meta", text: `frame #${det.frame_id} ${det.width}x${det.height}, ${det.inference_ms.toFixed(1)} ms inference, ${ago(det.timestamp)}` }));
    card.append(figuresTable(det));
  }
  return card;
}

function renderDevices() {
  const box = document.getElementById("devices");
  const ids = [...model.devices.keys()].sort();
  box.replaceChildren(...ids.map((id) => renderDevice(model.devices.get(id))));
  document.getElementById("no-devices").hidden = ids.length > 0;
}

// ---- alerts --------------------------------------------------------------------------------------------
async function setAck(eventId, ack) {
  const res = await fetch(`/api/alerts/${encodeURIComponent(eventId)}/${ack ? "ack" : "unack"}`, {
    method: "POST", headers: { "X-DrywallQA": "1", "Content-Type": "application/json" }, body: "{}",
  });
  if (res.ok) { const a = await res.json(); model.alerts.set(a.event_id, a); renderAlerts(); }
  else alert(`Could not update the alert: ${res.status} ${await res.text()}`);
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
    el("div", { class: "figures-line", text: figures.join(" | ") }),
    a.acked ? el("div", { class: "meta ack-info", text: `acknowledged ${fmtTime(a.ack.acked_at)}` }) : null));
  li.append(el("button", { class: "ack", text: a.acked ? "undo" : "acknowledge", onclick: () => setAck(a.event_id, !a.acked) }));
  return li;
}

function renderAlerts() {
  const cls = document.getElementById("alert-class").value;
  const showAcked = document.getElementById("show-acked").checked;
  const all = [...model.alerts.values()].sort((x, y) => y.timestamp - x.timestamp);
  const shown = all.filter((a) => (!cls || a.class_name === cls) && (showAcked || !a.acked));
  document.getElementById("alerts").replaceChildren(...shown.map(renderAlert));
  document.getElementById("no-alerts").hidden = shown.length > 0;
  const open = all.filter((a) => !a.acked).length;
  document.getElementById("alert-count").textContent = `(${open} open, ${all.length - open} acknowledged)`;
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
    model.alerts = new Map(s.alerts.map((a) => [a.event_id, a]));
    model.broker = s.broker;
    model.classes = s.classes;
    document.getElementById("logout").hidden = !s.auth;
    model.streamUp = true;
    renderClassFilter(); renderLinks(); renderDevices(); renderAlerts();
  });
  source.addEventListener("device", (ev) => {
    const d = JSON.parse(ev.data);
    model.devices.set(d.device_id, d);
    renderDevices();
  });
  source.addEventListener("alert", (ev) => {
    const a = JSON.parse(ev.data);
    if (!a.event_id) return;
    const isNew = !model.alerts.has(a.event_id);
    model.alerts.set(a.event_id, a);
    if (isNew) renderClassFilter();
    renderAlerts();
  });
  source.addEventListener("broker", (ev) => {
    const wasConnected = model.broker && model.broker.connected;
    model.broker = JSON.parse(ev.data);
    renderLinks();
    if (wasConnected !== model.broker.connected) renderDevices();  // toggles the "last known" labels
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("alert-class").addEventListener("change", renderAlerts);
  document.getElementById("show-acked").addEventListener("change", renderAlerts);
  renderLinks();
  connect();
  setInterval(() => { renderLinks(); }, 5000);
});
