// weir dashboard: polls the JSON API every few seconds and redraws. No dependencies.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const POLL_MS = 2000;
let selectedUser = params.get("user");
let view = location.hash === "#pipeline" ? "pipeline" : "fraud";

function api(path) {
  const url = token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
  return fetch(url, { cache: "no-store" }).then(async (r) => {
    let body;
    try { body = await r.json(); } catch (e) { body = { error: `${r.status} ${r.statusText}` }; }
    if (!r.ok || body.error) throw new Error(body.error || `${r.status} ${r.statusText}`);
    return body;
  });
}

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const money = (v) => v == null ? "–" : Number(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const count = (v) => v == null ? "–" : Math.round(Number(v)).toLocaleString("en-US");
const when = (ms) => ms == null ? "–" : new Date(Number(ms)).toLocaleString("en-GB", { hour12: false });
function ago(ms) {
  if (ms == null) return "–";
  const s = Math.max(0, (Date.now() - Number(ms)) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return when(ms);
}
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; n = Number(n);
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function notice(el, message, kind) {
  el.hidden = !message;
  el.className = `notice${kind === "error" ? " error" : ""}`;
  el.textContent = message || "";
}

function health(kind, text) {
  $("health").className = `health ${kind}`;
  $("health-text").textContent = text;
}

// ---- Fraud view -------------------------------------------------------------------------

let usersLoaded = false;

async function loadUsers() {
  const data = await api("api/users");
  const select = $("user");
  const current = selectedUser;
  select.innerHTML = data.users.map((u) => {
    const name = u.name ? `${u.name} (user ${u.user_id})` : `User ${u.user_id}`;
    const alerts = u.alerts ? ` · ${u.alerts} alert${u.alerts === 1 ? "" : "s"}` : "";
    return `<option value="${esc(u.user_id)}">${esc(name)} · ${count(u.transactions)} tx${alerts}</option>`;
  }).join("");
  if (current == null && data.users.length) selectedUser = String(data.users[0].user_id);
  if (selectedUser != null && ![...select.options].some((o) => o.value === String(selectedUser))) {
    select.insertAdjacentHTML("afterbegin", `<option value="${esc(selectedUser)}">User ${esc(selectedUser)}</option>`);
  }
  select.value = selectedUser ?? "";
  usersLoaded = true;
  if (!data.users.length) notice($("notice"), "No transactions in the lake yet: the chart appears when the first ones land.");
}

async function loadChart() {
  if (selectedUser == null) return;
  const box = $("chart");
  try {
    const c = await api(`api/users/${encodeURIComponent(selectedUser)}/chart`);
    box.innerHTML = c.svg;
    box.dataset.user = String(c.user_id);
    box.dataset.anomalies = c.anomalies.join(",");
    const who = c.name ? `${esc(c.name)} (user ${c.user_id})` : `User ${c.user_id}`;
    $("user-summary").innerHTML = `<b>${who}</b> · ${count(c.transactions)} transactions${c.truncated ? " (latest shown)" : ""} · average <b>${money(c.average)}</b> · <span class="red"><b>${c.anomalies.length}</b> flagged</span>`;
    notice($("notice"), c.scored ? "" : "The fraud rule has written no alerts yet (its table appears with the first anomaly).");
    document.body.dataset.chart = "ready";
  } catch (e) {
    box.innerHTML = "";
    delete box.dataset.user;
    $("user-summary").textContent = "";
    notice($("notice"), e.message, "error");
    document.body.dataset.chart = "error";
  }
}

async function loadAlerts() {
  const data = await api("api/alerts?limit=15");
  const note = $("alerts-note");
  note.hidden = !data.note; note.textContent = data.note || "";
  $("alerts").querySelector("tbody").innerHTML = data.alerts.map((a) => {
    const ratio = a.user_avg ? (a.amount / a.user_avg).toFixed(1) + "×" : "–";
    const who = a.name ? `${esc(a.name)} <span class="muted">#${esc(a.user_id)}</span>` : `#${esc(a.user_id)}`;
    return `<tr class="clickable" data-user="${esc(a.user_id)}"><td>${esc(a.transaction_id)}</td><td>${who}</td>` +
      `<td class="num red">${money(a.amount)}</td><td class="num">${money(a.user_avg)}</td><td class="num">${ratio}</td>` +
      `<td>${esc(a.transaction_date ? when(Date.parse(a.transaction_date)) : "–")}</td><td>${ago(a.written_ms)}</td></tr>`;
  }).join("") || `<tr><td colspan="7" class="muted">No anomalies yet.</td></tr>`;
}

async function refreshFraud() {
  try {
    if (!usersLoaded) await loadUsers();
    await Promise.all([loadChart(), loadAlerts()]);
    health("ok", "live");
  } catch (e) {
    notice($("notice"), e.message, "error");
    health("warn", "lake not ready");
  }
}

$("user").addEventListener("change", (e) => { selectUser(e.target.value); });
$("user-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = $("user-id").value.trim();
  if (v) selectUser(v);
});
$("alerts").addEventListener("click", (e) => {
  const tr = e.target.closest("tr[data-user]");
  if (tr) selectUser(tr.dataset.user);
});

function selectUser(id) {
  selectedUser = String(id);
  const p = new URLSearchParams(location.search);
  p.set("user", selectedUser);
  history.replaceState(null, "", `?${p}${location.hash}`);
  usersLoaded = false;
  refreshFraud();
}

// ---- Pipeline view ----------------------------------------------------------------------

async function refreshPipeline() {
  try {
    const p = await api("api/pipeline");
    const live = p.live;
    notice($("pipeline-note"), live.running ? "" : "No pipeline runs in this process (weir serve): live figures appear when the dashboard is started by weir run. Tables and dead letters below are read from the lake.");
    $("kpi-position").textContent = live.position ?? "–";
    $("kpi-wal").textContent = live.server_wal_end ? `server WAL at ${live.server_wal_end}` : "";
    $("kpi-lag").textContent = live.running ? `${live.lag_seconds.toFixed(1)} s` : "–";
    $("kpi-lag-bytes").textContent = live.running ? `${bytes(live.lag_bytes)} of WAL behind` : "";
    $("kpi-captured").textContent = live.running ? count(live.rates.captured) : "–";
    $("kpi-plugins").textContent = live.running ? count(live.rates.plugins) : "–";
    $("kpi-written").textContent = live.running ? count(live.rates.written) : "–";
    $("kpi-commits").textContent = live.running ? `${count(live.totals.written)} rows in ${count(live.commits)} commits` : "changes/s into Delta";
    const copies = live.backfill || [];
    $("backfill-card").hidden = copies.length === 0;
    $("backfill").querySelector("tbody").innerHTML = copies.map((b) =>
      `<tr><td>${esc(b.table)}</td><td class="num">${count(b.rows)}</td><td class="num">${b.estimated_rows > 0 ? count(b.estimated_rows) : "not estimated"}</td>` +
      `<td class="num">${count(b.rows_per_second)}</td><td>${b.done ? "done" : b.eta_seconds != null ? `copying, ${count(b.eta_seconds)} s left` : "copying"}</td></tr>`
    ).join("");
    $("plugins").querySelector("tbody").innerHTML = live.plugins.map((x) =>
      `<tr><td>${esc(x.name)}</td><td class="num">${count(x.documents)}</td><td class="num${x.failures ? " red" : ""}">${count(x.failures)}</td><td class="num">${(x.mean_ns_per_document / 1000).toFixed(1)} µs</td></tr>`
    ).join("") || `<tr><td colspan="4" class="muted">${live.running ? "No plugin configured." : "–"}</td></tr>`;
    const dead = p.dead_letters || { count: 0, recent: [] };
    $("dead-count").textContent = count(dead.count);
    $("dead-count").className = dead.count > 0 ? "badge red" : "badge";
    const recent = live.recent_failures.length
      ? live.recent_failures.map((f) => ({ plugin: f.plugin, kind: f.kind, error: f.error, source_table: f.table, at_ms: f.at_ms }))
      : dead.recent;
    $("dead").querySelector("tbody").innerHTML = recent.map((d) =>
      `<tr><td>${esc(d.plugin)}</td><td>${esc(d.kind)}</td><td>${esc(d.error)}</td><td>${esc(d.source_table)}</td><td>${ago(d.at_ms)}</td></tr>`
    ).join("") || `<tr><td colspan="5" class="muted">None: every document went through every plugin.</td></tr>`;
    $("lake-url").textContent = p.lake;
    $("tables").querySelector("tbody").innerHTML = (p.tables || []).map((t) =>
      `<tr><td>${esc(t.name)}</td><td class="num">${count(t.version)}</td><td>${ago(t.last_commit_ms)}</td></tr>`
    ).join("") || `<tr><td colspan="3" class="muted">${esc(p.lake_error || "The lake has no tables yet.")}</td></tr>`;
    if (!live.running) health("warn", "lake only");
    else if (live.lag_seconds > 5) health("warn", `${live.lag_seconds.toFixed(0)} s behind`);
    else health("ok", "live");
  } catch (e) {
    notice($("pipeline-note"), e.message, "error");
    health("bad", "unreachable");
  }
}

// ---- Navigation and polling ---------------------------------------------------------------

function show(v) {
  view = v;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === v);
  $("view-fraud").hidden = v !== "fraud";
  $("view-pipeline").hidden = v !== "pipeline";
  tick();
}
for (const a of document.querySelectorAll("nav a")) {
  a.addEventListener("click", (e) => { e.preventDefault(); history.replaceState(null, "", `${location.search}#${a.dataset.view}`); show(a.dataset.view); });
}
if (token) $("metrics-link").href = `metrics?token=${encodeURIComponent(token)}`;

let timer = null;
async function tick() {
  clearTimeout(timer);
  await (view === "fraud" ? refreshFraud() : refreshPipeline());
  timer = setTimeout(tick, POLL_MS);
}
show(view);
