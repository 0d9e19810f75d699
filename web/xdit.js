// comfy_xdit: the "xDiT" sidebar tab. Shows the worker pool (state, ranks with GPU, memory and free memory,
// loaded models and LoRAs, parallel strategy), per-rank progress while a request runs, and the
// last error; Stop pool / Unload models buttons. Reads GET /xdit/status when the tab opens, then
// follows the server's websocket events (xdit.status, xdit.progress, xdit.error): no polling.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "comfy_xdit.pool";
const KIND_LABELS = { sample: "Sampling", decode: "Decoding", encode: "Encoding", load: "Loading" };

const store = {
  status: null,     // the last status payload
  activity: null,   // the running (or last) request, fresher than status.activity
  error: null,      // the last error event
  loading: false,   // a status fetch is under way
  pending: null,    // the route of a button's POST under way
  notice: null,     // {severity, text}: outcome of the last button
};
const views = new Set();

function changed() {
  for (const view of [...views]) {
    // The frontend renders into an element before it joins the page; one that has left it is gone.
    if (view.el.isConnected) view.seen = true;
    else if (view.seen) { views.delete(view); continue; }
    view.update();
  }
}

// --- server state --------------------------------------------------------------------------
// Is activity `a` at least as recent as `b`? A status payload is built a moment after its request
// moved on, so it must not take the bars back to an older step.
function newer(a, b) {
  if (!b) return true;
  if (!a) return false;
  if (a.started !== b.started) return (a.started ?? 0) > (b.started ?? 0);
  if (a.active !== b.active) return !a.active;
  return (a.step ?? 0) >= (b.step ?? 0);
}

function applyStatus(payload) {
  if (!payload || typeof payload !== "object") return;
  store.status = payload;
  if (newer(payload.activity, store.activity)) store.activity = payload.activity;
  store.error = payload.error ?? null;
  changed();
}

function applyProgress(detail) {
  const activity = detail?.activity ?? null;
  if (activity?.active && activity.started !== store.activity?.started) store.notice = null;  // a new request
  store.activity = activity;
  changed();
}

function applyError(err) {
  if (!err) return;
  store.error = err;
  store.notice = null;
  toast("error", err.summary || "xDiT request failed", err.detail || err.message || "", 15000);
  changed();
}

function toast(severity, summary, detail, life = 6000) {
  const t = app.extensionManager?.toast;
  if (t?.add) {
    t.add({ severity, summary, detail, life });
  } else if (t) {  // newer frontends: toast.error(title, {description})
    const fn = t[severity === "warn" ? "warning" : severity] ?? t.info;
    fn?.call(t, summary, { description: detail });
  } else {
    console[severity === "error" ? "error" : "log"](`${summary}: ${detail}`);
  }
}

async function refresh() {
  store.loading = true;
  changed();
  try {
    const resp = await api.fetchApi("/xdit/status");
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    applyStatus(await resp.json());
  } catch (e) {
    store.notice = { severity: "error", text: `Could not read the pool status: ${e.message}` };
  } finally {
    store.loading = false;
    changed();
  }
}

async function post(route) {
  store.pending = route;
  store.notice = null;
  changed();
  try {
    const resp = await api.fetchApi(route, { method: "POST" });
    let body = {};
    try { body = await resp.json(); } catch { /* not JSON */ }
    if (!resp.ok || body.ok === false) {
      const text = body.error || body.message || `HTTP ${resp.status}`;
      store.notice = { severity: "warn", text };
      toast(resp.status === 409 ? "warn" : "error", "xDiT pool", text);
      return;
    }
    if (body.status) applyStatus(body.status);
    if (route.endsWith("/stop")) {
      store.notice = { severity: "info", text: body.pending ? body.message : "Pool stopped." };
    } else {
      const n = (body.unloaded || []).length;
      store.notice = { severity: "info", text: n ? `Unloaded ${n} model${n === 1 ? "" : "s"}.` : "Nothing was loaded." };
    }
  } catch (e) {
    store.notice = { severity: "error", text: `${route}: ${e.message}` };
    toast("error", "xDiT pool", `${route}: ${e.message}`);
  } finally {
    store.pending = null;
    changed();
  }
}

// --- rendering -------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const gib = (bytes) => (bytes / 2 ** 30).toFixed(1);
const seconds = (s) => (s >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${s.toFixed(1)} s`);
const time = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");

function bar(fraction, label, { indeterminate = false, kind = "progress", testid } = {}) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("div", { class: `xdit-bar xdit-bar-${kind}${indeterminate ? " xdit-indeterminate" : ""}`, "data-testid": testid,
                    role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                    "aria-valuenow": indeterminate ? null : Math.round(pct) },
           h("div", { class: "xdit-bar-fill", style: indeterminate ? "" : `width:${pct.toFixed(1)}%` }),
           h("span", { class: "xdit-bar-label" }, label));
}

function activityLine(a) {
  if (!a) return null;
  const what = `${KIND_LABELS[a.kind] || a.kind}${a.model ? ` ${a.model}` : ""}`;
  const parts = [];
  if (a.active) {
    if (a.total) parts.push(`step ${a.step ?? 0}/${a.total}`);
    if (a.elapsed) parts.push(seconds(a.elapsed));
    if (a.eta >= 1) parts.push(`~${seconds(a.eta)} left`);
    return h("div", { class: "xdit-activity xdit-active", "data-testid": "xdit-activity" },
             h("span", { class: "xdit-spinner" }), `${what}${parts.length ? " · " + parts.join(" · ") : ""}`);
  }
  const outcome = { ok: "done", error: "failed", cancelled: "cancelled" }[a.outcome] || a.outcome || "done";
  return h("div", { class: "xdit-activity", "data-testid": "xdit-activity" },
           `Last: ${what} — ${outcome}${a.elapsed ? ` in ${seconds(a.elapsed)}` : ""}`);
}

function rankRows(status, activity) {
  const live = new Map();
  if (activity?.active) for (const r of activity.ranks || []) live.set(r.rank, r);
  let ranks = status?.ranks || [];
  if (!ranks.length && live.size) ranks = [...live.values()].map((r) => ({ rank: r.rank }));
  return ranks.map((r) => {
    const p = live.get(r.rank) ?? (activity?.active ? r.progress : null);
    let progress;
    if (p && p.active !== false) {
      const determinate = p.total && p.step !== null && p.step !== undefined;
      progress = bar(determinate ? p.step / p.total : 0, determinate ? `${p.step}/${p.total}` : KIND_LABELS[activity?.kind] || "busy",
                     { indeterminate: !determinate, testid: `xdit-progress-${r.rank}` });
    } else {
      progress = bar(0, "idle", { testid: `xdit-progress-${r.rank}` });
    }
    const memory = r.memory_total
      ? bar(r.memory_used ? r.memory_used / r.memory_total : 0,
            `${r.memory_used !== null && r.memory_used !== undefined ? gib(r.memory_used) : "?"} / ${gib(r.memory_total)} GiB`,
            { kind: "memory", testid: `xdit-memory-${r.rank}` })
      : null;
    // The whole GPU, every process on it (ComfyUI too): what is free, and what the others hold.
    const known = (v) => v !== null && v !== undefined;
    const free = r.memory_total && known(r.memory_free)
      ? h("div", { class: "xdit-dim xdit-gpu-free", "data-testid": `xdit-free-${r.rank}`,
                   title: known(r.memory_allocated) ? `this worker: ${gib(r.memory_allocated)} GiB allocated, ${gib(r.memory_reserved)} GiB reserved` : null },
          `${gib(r.memory_free)} GiB free on the GPU` +
          (known(r.memory_used) ? ` · other processes ${gib(Math.max(0, r.memory_total - r.memory_free - r.memory_used))} GiB` : ""))
      : null;
    const where = [known(r.gpu_index) ? `GPU ${r.gpu_index}` : null, r.gpu || r.device, r.host].filter(Boolean).join(" · ");
    return h("div", { class: "xdit-rank", "data-testid": `xdit-rank-${r.rank}` },
             h("div", { class: "xdit-rank-head" }, h("b", {}, `rank ${r.rank}`), where ? h("span", { class: "xdit-dim" }, where) : null),
             memory, free, progress);
  });
}

function modelList(status) {
  const models = status?.models || [];
  const vaes = status?.vaes || [];
  if (!models.length && !vaes.length) return h("div", { class: "xdit-dim", "data-testid": "xdit-models" }, "No model loaded.");
  return h("ul", { class: "xdit-models", "data-testid": "xdit-models" },
           models.map((m) => h("li", {},
             h("b", {}, m.name),
             h("span", { class: "xdit-dim" }, ` ${[m.variant, m.dtype].filter(Boolean).join(", ")}`),
             h("div", { class: "xdit-dim" }, m.strategy || ""),
             (m.loras || []).length
               ? h("div", { class: "xdit-loras" }, "LoRA: ", m.loras.map((l) => `${l.name} ×${Number(l.strength).toFixed(2)}`).join(", "))
               : null)),
           vaes.map((v) => h("li", {}, h("b", {}, v.name), h("span", { class: "xdit-dim" }, ` VAE${v.dtype ? ", " + v.dtype : ""}`))));
}

function summaryLine(s) {
  if (!s) return store.loading ? "Reading the pool status…" : "";
  if (s.state === "stopped") return "No worker pool is running; it starts with the first xDiT node.";
  const parts = [];
  const n = s.world_size || s.ranks?.length;
  if (n) parts.push(`${n} rank${n === 1 ? "" : "s"}`);
  if (s.device) parts.push(s.device);
  if (s.strategy) parts.push(s.strategy);
  return parts.join(" · ");
}

function mount(el) {
  // The frontend may render the same element again: one view per element.
  if (el.__xditView) views.delete(el.__xditView);
  el.replaceChildren();
  const badge = h("span", { class: "xdit-badge", "data-testid": "xdit-state" });
  const summary = h("div", { class: "xdit-summary", "data-testid": "xdit-summary" });
  const activity = h("div", {});
  const ranks = h("div", { class: "xdit-ranks", "data-testid": "xdit-ranks" });
  const models = h("div", {});
  const error = h("div", {});
  const notice = h("div", {});
  const stop = h("button", { class: "xdit-button xdit-danger", "data-testid": "xdit-stop", title: "Stop the worker pool: cancels the running request and frees every GPU", onclick: () => post("/xdit/stop") }, "Stop pool");
  const unload = h("button", { class: "xdit-button", "data-testid": "xdit-unload", title: "Unload every model and VAE from the workers; the pool stays up", onclick: () => post("/xdit/unload") }, "Unload models");
  const reload = h("button", { class: "xdit-button", "data-testid": "xdit-refresh", title: "Read the status again", onclick: () => refresh() }, "Refresh");
  el.append(h("div", { class: "xdit-pool" },
    h("div", { class: "xdit-header" }, h("span", { class: "xdit-title" }, "xDiT worker pool"), badge),
    summary, activity,
    h("div", { class: "xdit-section" }, "Ranks"), ranks,
    h("div", { class: "xdit-section" }, "Loaded"), models,
    error, notice,
    h("div", { class: "xdit-actions" }, stop, unload, reload)));

  const view = {
    el,
    seen: false,
    update() {
      const s = store.status;
      const state = s?.state || (store.loading ? "loading" : "unknown");
      const busy = !!store.activity?.active;
      const shown = busy ? "busy" : state;
      badge.textContent = shown;
      badge.className = `xdit-badge xdit-state-${shown}`;
      summary.textContent = busy && s?.state === "stopped" ? "Starting the worker pool…" : summaryLine(s);
      if (s?.stale) summary.append(h("div", { class: "xdit-dim" }, "Busy: details as of the last idle moment."));
      if (s?.state === "failed" && s.reason && s.reason !== store.error?.detail) summary.append(h("div", { class: "xdit-error-text" }, s.reason));
      activity.replaceChildren(...[activityLine(store.activity)].filter(Boolean));
      const rows = rankRows(s, store.activity);
      ranks.replaceChildren(...(rows.length ? rows : [h("div", { class: "xdit-dim" }, "No ranks.")]));
      models.replaceChildren(modelList(s));
      const err = store.error;
      error.replaceChildren(...(err ? [h("div", { class: "xdit-error", "data-testid": "xdit-error" },
        h("div", {}, h("b", {}, err.summary || "Error"), h("span", { class: "xdit-dim" }, ` ${time(err.time)}`)),
        h("div", { class: "xdit-error-text" }, err.detail || ""))] : []));
      notice.replaceChildren(...(store.notice ? [h("div", { class: `xdit-notice xdit-notice-${store.notice.severity}`, "data-testid": "xdit-notice" }, store.notice.text)] : []));
      const loaded = (s?.models?.length || 0) + (s?.vaes?.length || 0);
      stop.disabled = !!store.pending || !s || (s.state === "stopped" && !busy);
      unload.disabled = !!store.pending || !s || s.state !== "running" || busy || (!loaded && !s.stale);
      reload.disabled = store.loading;
      stop.textContent = store.pending === "/xdit/stop" ? "Stopping…" : "Stop pool";
      unload.textContent = store.pending === "/xdit/unload" ? "Unloading…" : "Unload models";
    },
  };
  el.__xditView = view;
  views.add(view);
  view.update();
  refresh();
}

function unmountAll() {
  views.clear();
}

const STYLE = `
.xdit-pool { padding: 10px 12px; display: flex; flex-direction: column; gap: 8px; font-size: 13px;
  color: var(--fg-color, #ddd); }
.xdit-header { display: flex; align-items: center; justify-content: space-between; }
.xdit-title { font-weight: 600; font-size: 14px; }
.xdit-badge { padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #555; color: #fff; }
.xdit-state-running { background: #2e7d32; } .xdit-state-busy { background: #1565c0; }
.xdit-state-failed { background: #c62828; } .xdit-state-stopped { background: #616161; }
.xdit-dim { color: var(--descrip-text, #999); }
.xdit-section { margin-top: 4px; font-weight: 600; text-transform: uppercase; font-size: 11px; letter-spacing: .05em;
  color: var(--descrip-text, #999); border-bottom: 1px solid var(--border-color, #444); padding-bottom: 2px; }
.xdit-rank { display: flex; flex-direction: column; gap: 3px; padding: 4px 0; }
.xdit-rank-head { display: flex; gap: 8px; align-items: baseline; flex-wrap: wrap; }
.xdit-bar { position: relative; height: 16px; border-radius: 4px; overflow: hidden;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); }
.xdit-bar-fill { height: 100%; background: #1e88e5; transition: width .2s; }
.xdit-bar-memory { height: 12px; } .xdit-bar-memory .xdit-bar-fill { background: #8e24aa; }
.xdit-bar-label { position: absolute; inset: 0; font-size: 11px; line-height: 14px; text-align: center; }
.xdit-bar-memory .xdit-bar-label { line-height: 11px; font-size: 10px; }
.xdit-gpu-free { font-size: 11px; }
.xdit-indeterminate .xdit-bar-fill { width: 30%; animation: xdit-slide 1.2s linear infinite; }
@keyframes xdit-slide { from { transform: translateX(-100%); } to { transform: translateX(340%); } }
.xdit-activity { display: flex; gap: 6px; align-items: center; }
.xdit-spinner { width: 10px; height: 10px; border-radius: 50%; border: 2px solid #1e88e5; border-right-color: transparent;
  animation: xdit-spin .8s linear infinite; flex: none; }
@keyframes xdit-spin { to { transform: rotate(360deg); } }
.xdit-models { margin: 0; padding-left: 16px; display: flex; flex-direction: column; gap: 4px; }
.xdit-loras { font-size: 12px; }
.xdit-error { border: 1px solid #c62828; border-radius: 4px; padding: 6px; background: rgba(198, 40, 40, .12); }
.xdit-error-text { color: var(--error-text, #ff6b6b); white-space: pre-wrap; word-break: break-word; }
.xdit-notice { font-size: 12px; } .xdit-notice-warn { color: #ffb74d; } .xdit-notice-error { color: var(--error-text, #ff6b6b); }
.xdit-actions { display: flex; gap: 6px; flex-wrap: wrap; margin-top: 4px; }
.xdit-button { padding: 4px 10px; border-radius: 4px; cursor: pointer; border: 1px solid var(--border-color, #555);
  background: var(--comfy-input-bg, #333); color: var(--input-text, #ddd); }
.xdit-button:disabled { opacity: .45; cursor: default; }
.xdit-danger:not(:disabled) { border-color: #c62828; }
`;

function addStyle() {
  if (document.getElementById("xdit-pool-style")) return;
  document.head.append(h("style", { id: "xdit-pool-style" }, STYLE));
}

app.registerExtension({
  name: "comfy_xdit.pool",
  async setup() {
    addStyle();
    api.addEventListener("xdit.status", (e) => applyStatus(e.detail));
    api.addEventListener("xdit.progress", (e) => applyProgress(e.detail));
    api.addEventListener("xdit.error", (e) => applyError(e.detail));
    api.addEventListener("reconnected", () => { if (views.size) refresh(); });
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-server",
      title: "xDiT",
      tooltip: "xDiT worker pool",
      type: "custom",
      render: (el) => mount(el),
      destroy: () => unmountAll(),
    });
  },
});
