// Stand-in for ComfyUI's /scripts/api.js: fetchApi() prefixes "/api" as the frontend does, and
// messages of the server's websocket ({type, data}) become CustomEvents with `detail` = data,
// for the types someone listens to (addEventListener registers them), as in the frontend.

class StubApi extends EventTarget {
  #registered = new Set();
  api_base = "";
  socket = null;
  unknown = [];

  apiURL(route) {
    return this.api_base + "/api" + route;
  }

  fetchApi(route, options = {}) {
    options.headers ??= {};
    options.cache ??= "no-cache";
    return fetch(this.apiURL(route), options);
  }

  addEventListener(type, callback, options) {
    super.addEventListener(type, callback, options);
    this.#registered.add(type);
  }

  dispatchCustomEvent(type, detail) {
    return super.dispatchEvent(detail === undefined ? new CustomEvent(type) : new CustomEvent(type, { detail }));
  }

  init() {
    return new Promise((resolve, reject) => {
      this.socket = new WebSocket(`ws://${location.host}/ws`);
      this.socket.addEventListener("open", () => resolve());
      this.socket.addEventListener("error", (e) => reject(e));
      this.socket.addEventListener("message", (event) => {
        const msg = JSON.parse(event.data);
        if (this.#registered.has(msg.type)) super.dispatchEvent(new CustomEvent(msg.type, { detail: msg.data }));
        else this.unknown.push(msg.type);
      });
    });
  }
}

export const api = new StubApi();
window.__stub_api = api;
