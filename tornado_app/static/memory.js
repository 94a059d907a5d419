// The chat page's Memory panel: list, add, edit and delete what the assistant
// remembers about the signed-in user (GET/PUT/DELETE /api/memories, as the
// cookie's user). Separate from chat.js: it only needs the session cookie.
// Every text is put into the page with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    toggle: $("memory-toggle"), panel: $("memory-panel"), list: $("memory-list"),
    empty: $("memory-empty"), form: $("memory-form"), key: $("memory-key"),
    value: $("memory-value"), error: $("memory-error"), save: $("memory-save"),
    logout: $("logout"),
  };
  const url = (key) => "/api/memories" + (key === undefined ? "" : "/" + encodeURIComponent(key));

  async function request(method, key, body) {
    const options = {method, credentials: "same-origin", headers: {Accept: "application/json"}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(url(key), options);
    let answer = {};
    try {
      answer = await response.json();
    } catch { /* not JSON */ }
    if (!response.ok) {
      throw new Error(answer.error_description || `The server answered ${response.status}.`);
    }
    return answer;
  }

  function item(memory) {
    const row = document.createElement("li");
    row.className = "memory-item";
    row.dataset.key = memory.key;
    const key = document.createElement("div");
    key.className = "memory-key";
    key.textContent = memory.key;
    const value = document.createElement("p");
    value.className = "memory-value";
    value.textContent = memory.value;
    const edit = document.createElement("button");
    edit.type = "button";
    edit.className = "button ghost";
    edit.textContent = "Edit";
    edit.setAttribute("aria-label", `Edit ${memory.key}`);
    edit.addEventListener("click", () => {
      ui.key.value = memory.key;
      ui.value.value = memory.value;
      ui.value.focus();
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "button danger";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete ${memory.key}`);
    remove.addEventListener("click", () => act(() => request("DELETE", memory.key)));
    row.append(key, value, edit, remove);
    return row;
  }

  async function refresh() {
    const {memories} = await request("GET");
    ui.list.replaceChildren(...memories.map(item));
    ui.empty.hidden = memories.length > 0;
  }

  // Do a change, then show the list as the server has it (or the error).
  async function act(change) {
    ui.error.textContent = "";
    try {
      await change();
      await refresh();
      return true;
    } catch (error) {
      ui.error.textContent = error.message;
      return false;
    }
  }

  function show(open) {
    ui.panel.hidden = !open;
    ui.toggle.setAttribute("aria-expanded", String(open));
    if (open) {
      act(() => Promise.resolve()).then(() => ui.key.focus());
    }
  }

  ui.toggle.addEventListener("click", () => show(ui.panel.hidden));
  ui.logout.addEventListener("click", () => {
    show(false);
    ui.list.replaceChildren();
  });
  ui.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = ui.key.value.trim();
    if (!key || !ui.value.value.trim()) {
      ui.error.textContent = "Give both a name and what to remember.";
      return;
    }
    ui.save.disabled = true;  // one save at a time: the form is cleared after it
    try {
      if (await act(() => request("PUT", key, {value: ui.value.value}))) {
        ui.form.reset();
        ui.key.focus();
      }
    } finally {
      ui.save.disabled = false;
    }
  });
})();
