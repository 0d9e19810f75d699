// Drives the pack's sidebar tab in headless Chromium (playwright-core) against the stub server
// of test_web_sidebar.py. Settings come from the environment: XDIT_BASE_URL, XDIT_CHROMIUM (the
// browser), XDIT_PROFILE (a fresh user-data-dir), XDIT_OUT (screenshots). Prints one line per
// step, then "RESULT <json>"; exits 1 at the first failed check.

const path = require("path");
const { chromium } = require("playwright-core");

const base = process.env.XDIT_BASE_URL;
const out = process.env.XDIT_OUT;
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const SECRET_DIRS = JSON.parse(process.env.XDIT_SECRET_DIRS || "[]");
const TAB = "comfy_xdit.pool";
const shots = [];

function check(cond, message) {
  if (!cond) throw new Error(`check failed: ${message}`);
}

async function control(action, args = {}) {
  const resp = await fetch(`${base}/test/${action}`, { method: "POST", body: JSON.stringify(args),
                                                      headers: { "Content-Type": "application/json" } });
  check(resp.ok, `control ${action}: HTTP ${resp.status}`);
}

async function requests(method, route) {
  const log = await (await fetch(`${base}/test-log`)).json();
  return log.filter(([m, p]) => m === method && p === route).length;
}

(async () => {
  const context = await chromium.launchPersistentContext(process.env.XDIT_PROFILE, {
    executablePath: process.env.XDIT_CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1200, height: 820 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") pageErrors.push(m.text()); });
  page.on("response", (r) => { if (r.status() >= 400 && !r.url().includes("/test/")) pageErrors.push(`${r.status()} ${r.url()}`); });
  const text = (sel) => page.locator(sel).first().textContent({ timeout: 10000 });
  const waitText = (sel, want) => page.waitForFunction(([s, w]) => document.querySelector(s)?.textContent.includes(w),
                                                       [sel, want], { timeout: 10000 })
    .catch(async () => { throw new Error(`${sel} never showed ${JSON.stringify(want)}; it shows ${JSON.stringify(await page.locator(sel).first().textContent().catch(() => null))}`); });
  const progress = (rank) => page.locator(`[data-testid=xdit-progress-${rank}]`).getAttribute("aria-valuenow");
  const shot = async (name) => {
    const file = path.join(out, name);
    await page.screenshot({ path: file });
    shots.push(file);
  };
  const panelText = () => page.locator("#sidebar-panel").innerText();
  const noDirs = (s, where) => { for (const d of SECRET_DIRS) check(!s.includes(d), `${where} shows directory ${d}`); };
  try {
    await page.goto(`${base}/`);
    await page.waitForFunction(() => window.__ready === true, null, { timeout: 15000 });

    // The extension registers under its name and adds a custom sidebar tab.
    const info = await page.evaluate((id) => {
      const t = window.__stub.tabs.get(id);
      return { names: window.__stub.app.extensions.map((e) => e.name),
               tab: t && { type: t.type, icon: t.icon, title: t.title, tooltip: t.tooltip, destroy: typeof t.destroy } };
    }, TAB);
    check(info.names.includes("comfy_xdit.pool"), `extension names ${info.names}`);
    check(info.tab && info.tab.type === "custom" && info.tab.icon === "pi pi-server" && info.tab.title === "xDiT",
          `sidebar tab ${JSON.stringify(info.tab)}`);
    console.log("registered: extension comfy_xdit.pool, sidebar tab", JSON.stringify(info.tab));
    check(await requests("GET", "/api/xdit/status") === 0, "status fetched before the tab was opened");

    // Opening the tab reads the status once and shows it.
    await page.click(`[data-tab="${TAB}"]`);
    await waitText("[data-testid=xdit-state]", "running");
    await waitText("[data-testid=xdit-models]", "flux1-dev.safetensors");
    check(await page.locator("[data-testid^=xdit-rank-]").count() === 2, "two rank rows");
    const rank1 = await text("[data-testid=xdit-rank-1]");
    check(rank1.includes("NVIDIA H100 80GB HBM3") && rank1.includes("gpu-node-1"), `rank 1 row: ${rank1}`);
    check((await text("[data-testid=xdit-memory-1]")).includes("22.0 / 80.0 GiB"), "rank 1 memory");
    check(rank1.includes("GPU 3 · NVIDIA H100"), `rank 1 physical GPU: ${rank1}`);
    const free1 = await text("[data-testid=xdit-free-1]");
    check(free1 === "40.0 GiB free on the GPU · other processes 18.0 GiB", `rank 1 free memory: ${free1}`);
    const models = await text("[data-testid=xdit-models]");
    for (const want of ["flux1-dev.safetensors", "dev, bf16", "Ulysses 2", "style-lora.safetensors ×0.80", "ae.safetensors"]) {
      check(models.includes(want), `models list lacks ${want}: ${models}`);
    }
    check((await text("[data-testid=xdit-summary]")).includes("2 ranks · cuda · Ulysses 2"), "summary line");
    check(await progress(0) === "0" && (await text("[data-testid=xdit-progress-0]")) === "idle", "idle rank bar");
    noDirs(await panelText(), "the panel");
    await shot("01-status.png");
    console.log("status shown:", JSON.stringify((await panelText()).split("\n").slice(0, 4)));

    // A progress event dispatched in the page updates the per-rank bars.
    await page.evaluate(() => window.__stub_api.dispatchCustomEvent("xdit.progress", { activity: {
      id: 99, started: Date.now() / 1000 - 3, kind: "sample", model: "flux1-dev.safetensors", active: true, outcome: null, step: 5, total: 20,
      elapsed: 2.5, eta: 7.5, ranks: [{ rank: 0, step: 5, total: 20, active: true }, { rank: 1, step: 4, total: 20, active: true }] } }));
    await waitText("[data-testid=xdit-progress-0]", "5/20");
    check(await progress(0) === "25" && await progress(1) === "20", "bars at 25% and 20%");
    check((await text("[data-testid=xdit-state]")) === "busy", "busy badge");
    check((await text("[data-testid=xdit-activity]")).includes("Sampling flux1-dev.safetensors · step 5/20"), "activity line");
    check(await page.locator("[data-testid=xdit-unload]").isDisabled(), "unload disabled while busy");
    await shot("02-progress-dispatched.png");
    console.log("dispatched xdit.progress: bars 25% / 20%");

    // Progress the server sends over the websocket (tracker -> event sender -> send_sync).
    await control("begin", { kind: "sample", total: 10 });
    await control("step", { step: 4, total: 10 });
    await waitText("[data-testid=xdit-progress-1]", "4/10");
    check(await progress(0) === "40" && await progress(1) === "40", "websocket progress 40%");
    await shot("03-progress-websocket.png");
    // A status built a moment earlier (same request, older step) must not take the bars back.
    await page.evaluate(async () => {
      const s = await (await window.__stub_api.fetchApi("/xdit/status")).json();
      s.activity = { ...s.activity, step: 2, ranks: s.activity.ranks.map((r) => ({ ...r, step: 2 })) };
      window.__stub_api.dispatchCustomEvent("xdit.status", s);
    });
    await page.waitForTimeout(200);
    check(await progress(0) === "40", "an older status moved the bars back");
    await control("end");
    await waitText("[data-testid=xdit-activity]", "done");
    await waitText("[data-testid=xdit-state]", "running");
    check((await text("[data-testid=xdit-progress-0]")) === "idle", "bars idle after the request");
    console.log("websocket xdit.progress 4/10, then xdit.status after the request");

    // Unload models: POST, then the list empties.
    check(!(await page.locator("[data-testid=xdit-unload]").isDisabled()), "unload enabled when idle");
    await page.click("[data-testid=xdit-unload]");
    await waitText("[data-testid=xdit-notice]", "Unloaded 2 models.");
    await waitText("[data-testid=xdit-models]", "No model loaded.");
    check(await requests("POST", "/api/xdit/unload") === 1, "one POST /api/xdit/unload");
    await shot("04-unloaded.png");
    console.log("unload: POST /api/xdit/unload, models gone");

    // A rank dies during a decode: toast with the root cause, the panel shows it.
    await control("begin", { kind: "decode" });
    await control("fail", { die: true });
    await page.waitForSelector("[data-testid=toast]", { timeout: 10000 });
    const toasts = await page.evaluate(() => window.__stub.toasts);
    check(toasts.length === 1 && toasts[0].severity === "error", `toasts ${JSON.stringify(toasts)}`);
    check(toasts[0].summary === "xDiT decode failed: rank 1 (pid 4001) died", `toast summary ${toasts[0].summary}`);
    check(toasts[0].detail === "rank 1: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB", `toast detail ${toasts[0].detail}`);
    noDirs(JSON.stringify(toasts), "the toast");
    await waitText("[data-testid=xdit-state]", "failed");
    check((await text("[data-testid=xdit-error]")).includes("CUDA out of memory"), "error box");
    noDirs(await panelText(), "the panel");
    await shot("05-error-toast.png");
    console.log("xdit.error toast:", JSON.stringify(toasts[0]));

    // Stop pool: POST, then stopped.
    await page.click("[data-testid=xdit-stop]");
    await waitText("[data-testid=xdit-state]", "stopped");
    await waitText("[data-testid=xdit-summary]", "No worker pool is running");
    check(await requests("POST", "/api/xdit/stop") === 1, "one POST /api/xdit/stop");
    check(await page.locator("[data-testid=xdit-stop]").isDisabled(), "stop disabled once stopped");
    await shot("06-stopped.png");
    console.log("stop: POST /api/xdit/stop, state stopped");

    // No polling: nothing is fetched while idle; closing and opening the tab reads the status once.
    const gets = await requests("GET", "/api/xdit/status");
    await page.waitForTimeout(2000);
    check(await requests("GET", "/api/xdit/status") === gets, "status polled while idle");
    await page.click(`[data-tab="${TAB}"]`);
    check(!(await page.evaluate((id) => window.__stub.isOpen(id), TAB)), "tab closed");
    await page.click(`[data-tab="${TAB}"]`);
    await waitText("[data-testid=xdit-state]", "stopped");
    await page.waitForTimeout(300);
    check(await requests("GET", "/api/xdit/status") === gets + 1, "one status read per opening");
    console.log(`status reads: ${gets + 1} in all (one per opening, and one by this test)`);

    const leftovers = await page.evaluate(() => ({ errors: window.__errors, unknown: window.__stub_api.unknown }));
    check(leftovers.errors.length === 0 && pageErrors.length === 0, `page errors ${JSON.stringify([leftovers.errors, pageErrors])}`);
    check(leftovers.unknown.length === 0, `unhandled websocket types ${leftovers.unknown}`);
    console.log("RESULT " + JSON.stringify({ ok: true, screenshots: shots }));
  } catch (e) {
    await shot("failure.png").catch(() => {});
    console.log("RESULT " + JSON.stringify({ ok: false, error: String(e && e.stack || e), screenshots: shots, pageErrors }));
    process.exitCode = 1;
  } finally {
    await context.close();
  }
})();
