// Stand-in for ComfyUI's /scripts/app.js: the part of `app` the pack's extension uses.
// registerExtension() collects extensions, setup() runs their setup(app) as the frontend does,
// extensionManager.registerSidebarTab() adds a button to the stub's sidebar, and
// extensionManager.toast.add() shows a toast (recorded in window.__stub.toasts).

const extensions = [];
const tabs = new Map();
const toasts = [];
let open = null;  // {tab, el}

function toggle(id) {
  const panel = document.getElementById("sidebar-panel");
  if (open) {
    const was = open.tab.id;
    open.tab.destroy?.();
    open.el.remove();
    open = null;
    panel.hidden = true;
    document.querySelector(`[data-tab="${was}"]`)?.classList.remove("active");
    if (was === id) return;
  }
  const tab = tabs.get(id);
  const el = document.createElement("div");
  el.className = "tab-content";
  open = { tab, el };
  document.querySelector(`[data-tab="${id}"]`)?.classList.add("active");
  tab.render(el);  // as the frontend does: into an element not yet in the page
  panel.append(el);
  panel.hidden = false;
}

export const app = {
  extensions,
  registerExtension(extension) {
    if (!extension?.name) throw new Error("an extension needs a name");
    if (extensions.some((e) => e.name === extension.name)) throw new Error(`extension ${extension.name} registered twice`);
    extensions.push(extension);
  },
  extensionManager: {
    registerSidebarTab(tab) {
      for (const key of ["id", "title", "type", "render"]) if (!tab[key]) throw new Error(`sidebar tab without ${key}`);
      if (tab.type !== "custom") throw new Error("the stub renders custom tabs only");
      tabs.set(tab.id, tab);
      const button = document.createElement("button");
      button.className = "tab-button";
      button.dataset.tab = tab.id;
      button.title = tab.tooltip ?? tab.title;
      button.innerHTML = `<i class="${tab.icon}"></i><span></span>`;
      button.querySelector("span").textContent = tab.title;
      button.addEventListener("click", () => toggle(tab.id));
      document.getElementById("sidebar-buttons").append(button);
    },
    toast: {
      add(message) {
        toasts.push(message);
        const el = document.createElement("div");
        el.className = `toast toast-${message.severity}`;
        el.dataset.testid = "toast";
        const summary = document.createElement("b");
        summary.textContent = message.summary ?? "";
        const detail = document.createElement("div");
        detail.textContent = message.detail ?? "";
        el.append(summary, detail);
        document.getElementById("toasts").append(el);
      },
    },
  },
  async setup() {
    for (const e of extensions) await e.init?.(this);
    for (const e of extensions) await e.setup?.(this);
  },
};

window.__stub = { app, tabs, toasts, toggle, isOpen: (id) => open?.tab.id === id };
