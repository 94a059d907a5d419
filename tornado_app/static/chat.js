// The chat page: sign in, stream replies over the WebSocket, stop, history,
// new conversation, reconnect with backoff, log out. No framework, no build.
//
// The access token lives only in the HttpOnly cookie set by POST /token: this
// script never reads or stores it. Every text from the server or the user is
// put into the page with textContent, never as HTML.
"use strict";

(() => {
  const CLIENT_ID_KEY = "aiChat.clientId";
  const CANCELLED_TEXT = "The reply was cancelled.";
  const NOTHING_TO_CANCEL = "There is no reply in progress to cancel.";
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), actions: $("session-actions"),
    loginView: $("login-view"), loginForm: $("login-form"), loginError: $("login-error"),
    username: $("username"), password: $("password"), loginSubmit: $("login-submit"),
    chatView: $("chat-view"), messages: $("messages"), composer: $("composer"),
    input: $("message"), send: $("send"), stop: $("stop"),
    newConversation: $("new-conversation"), logout: $("logout"),
  };

  const state = {
    socket: null,
    clientId: null,
    pending: [],        // assistant bubbles awaiting their reply, in the order sent
    attempt: 0,         // reconnect attempts since the last good connection
    retryTimer: null,
    signedIn: false,
  };

  // Conversation ids

  function newClientId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);  // unlike randomUUID, also on plain-HTTP origins
    return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function currentClientId() {
    let id = localStorage.getItem(CLIENT_ID_KEY);
    if (!id || !/^[A-Za-z0-9._~:-]{1,128}$/.test(id)) {
      id = newClientId();
      localStorage.setItem(CLIENT_ID_KEY, id);
    }
    return id;
  }

  // Rendering (text only)

  function setStatus(text, kind = "idle") {
    ui.status.textContent = text;
    ui.status.dataset.state = kind;
  }

  function formatTime(iso) {
    if (!iso) return "";
    // Frame timestamps are UTC without a zone suffix.
    const date = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : iso + "Z");
    return isNaN(date) ? "" : date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  }

  function addBubble(kind, text, {time = "", note = ""} = {}) {
    const item = document.createElement("div");
    item.className = `msg msg-${kind}`;
    const who = document.createElement("span");
    who.className = "msg-who visually-hidden";
    who.textContent = {user: "You", assistant: "Assistant", system: "Notice",
                       error: "Error", warning: "Notice"}[kind] + ": ";
    const body = document.createElement("div");
    body.className = "msg-body";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "msg-meta";
    item.append(who, body, meta);
    setMeta(item, note, time);
    ui.messages.append(item);
    scrollToEnd();
    return item;
  }

  function setMeta(item, note, time) {
    const meta = item.querySelector(".msg-meta");
    meta.textContent = [note, formatTime(time)].filter(Boolean).join(" · ");
  }

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function notice(text, kind = "system") {
    return addBubble(kind, text);
  }

  function clearMessages() {
    ui.messages.replaceChildren();
    state.pending = [];
  }

  // Replies in flight

  function startReply() {
    const item = addBubble("assistant", "", {note: "Thinking…"});
    item.classList.add("streaming");
    ui.messages.setAttribute("aria-busy", "true");
    state.pending.push(item);
    updateButtons();
    return item;
  }

  function finishReply(outcome, text, time) {
    const item = state.pending.shift();
    if (!item) return false;
    item.classList.remove("streaming");
    const body = item.querySelector(".msg-body");
    if (outcome === "ok") {
      body.textContent = text;
      setMeta(item, "", time);
    } else if (outcome === "cancelled") {
      item.classList.add("msg-cancelled");
      if (!body.textContent) body.textContent = "(no text yet)";
      setMeta(item, "Stopped", time);
    } else {
      item.remove();
      notice(text, outcome === "rate" ? "warning" : "error");
    }
    if (!state.pending.length) ui.messages.removeAttribute("aria-busy");
    updateButtons();
    return true;
  }

  function appendChunk(delta) {
    const item = state.pending[0];
    if (!item) return;
    const body = item.querySelector(".msg-body");
    body.textContent += delta;
    setMeta(item, "Writing…", "");
    scrollToEnd();
  }

  function interruptReplies() {
    for (const item of state.pending) {
      item.classList.remove("streaming");
      item.classList.add("msg-cancelled");
      const body = item.querySelector(".msg-body");
      if (!body.textContent) body.textContent = "(no reply)";
      setMeta(item, "Interrupted: the connection was lost", "");
    }
    state.pending = [];
    ui.messages.removeAttribute("aria-busy");
  }

  // The socket

  function socketOpen() {
    return state.socket !== null && state.socket.readyState === WebSocket.OPEN;
  }

  function updateButtons() {
    ui.send.disabled = !socketOpen();
    ui.stop.disabled = !socketOpen() || state.pending.length === 0;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/ws/ai/ai-chat/${encodeURIComponent(state.clientId)}`;
    const socket = new WebSocket(url);  // the cookie authenticates it
    state.socket = socket;
    setStatus(state.attempt ? "Reconnecting…" : "Connecting…", "busy");
    socket.onopen = () => { if (state.socket === socket) updateButtons(); };
    socket.onmessage = (event) => { if (state.socket === socket) onFrame(event.data); };
    socket.onclose = (event) => { if (state.socket === socket) onClose(event); };
    updateButtons();
  }

  function disconnect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    const socket = state.socket;
    state.socket = null;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000, "Bye");
    updateButtons();
  }

  function onFrame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    const message = typeof frame.message === "string" ? frame.message : "";
    switch (frame.type) {
      case "system":
        if (message === CANCELLED_TEXT) {
          finishReply("cancelled", "", frame.timestamp);
        } else if (message.startsWith("Welcome")) {
          state.attempt = 0;
          setStatus("Connected", "ok");
        } else {
          notice(message);
        }
        break;
      case "ai_response_chunk":
        appendChunk(message);
        break;
      case "ai_response":
        finishReply("ok", message, frame.timestamp);
        break;
      case "error":
        if (message === NOTHING_TO_CANCEL || !state.pending.length) {
          notice(message, "error");
        } else {
          // The message at the head of the queue was refused or its reply failed.
          finishReply(message.startsWith("Rate limit") ? "rate" : "error", message);
        }
        break;
    }
  }

  function onClose(event) {
    state.socket = null;
    interruptReplies();
    updateButtons();
    if (event.code === 1008 && ["Authentication failed", "Token revoked",
                                "Account disabled"].includes(event.reason)) {
      showLogin(event.reason === "Authentication failed"
        ? "Your session has ended. Please sign in again." : event.reason + ".");
      return;
    }
    if (event.code === 1008 && event.reason === "Rate limit exceeded") {
      notice("Too many messages: the connection was closed. Reconnecting shortly.", "warning");
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    // Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to 30 s.
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    state.attempt += 1;
    setStatus(`Disconnected. Reconnecting in ${Math.ceil(delay / 1000)} s…`, "error");
    state.retryTimer = setTimeout(connect, delay);
  }

  // Sending

  function sendMessage() {
    const content = ui.input.value.trim();
    if (!content || !socketOpen()) return;
    state.socket.send(JSON.stringify({content, stream: true}));
    addBubble("user", content, {time: new Date().toISOString()});
    startReply();
    ui.input.value = "";
    autoSize();
    ui.input.focus();
  }

  function stopReply() {
    if (socketOpen() && state.pending.length) {
      state.socket.send(JSON.stringify({action: "cancel"}));
    }
    ui.input.focus();
  }

  function autoSize() {
    ui.input.style.height = "auto";
    ui.input.style.height = Math.min(ui.input.scrollHeight, 200) + "px";
  }

  // History

  async function loadHistory() {
    const response = await fetch(
      `/api/conversations/${encodeURIComponent(state.clientId)}/messages`,
      {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (response.status === 401) return false;
    if (!response.ok) throw new Error(`history: HTTP ${response.status}`);
    const body = await response.json();
    clearMessages();
    for (const row of body.messages) {
      const item = addBubble(row.role === "user" ? "user" : "assistant", row.content,
                             {time: row.created_at});
      if (row.status === "cancelled") {
        item.classList.add("msg-cancelled");
        setMeta(item, "Stopped", row.created_at);
      }
    }
    if (!body.messages.length) {
      notice("New conversation. Ask anything.");
    }
    return true;
  }

  // Views

  function showLogin(message = "") {
    disconnect();
    state.signedIn = false;
    clearMessages();
    ui.chatView.hidden = true;
    ui.actions.hidden = true;
    ui.loginView.hidden = false;
    ui.loginError.textContent = message;
    setStatus("", "idle");
    ui.username.focus();
  }

  async function showChat(afterLogin = false) {
    state.clientId = currentClientId();
    state.attempt = 0;
    if (!(await loadHistory())) {
      // Right after a good sign-in this means the browser dropped the cookie
      // (a Secure cookie, auth.cookie_secure, on a plain-HTTP page, say).
      showLogin(afterLogin ? "Signed in, but the browser did not keep the session cookie." : "");
      return;
    }
    state.signedIn = true;
    ui.loginView.hidden = true;
    ui.chatView.hidden = false;
    ui.actions.hidden = false;
    connect();
    ui.input.focus();
  }

  async function login(event) {
    event.preventDefault();
    const username = ui.username.value.trim();
    const password = ui.password.value;
    if (!username || !password) {
      ui.loginError.textContent = "Enter your username and password.";
      return;
    }
    ui.loginSubmit.disabled = true;
    ui.loginError.textContent = "";
    try {
      const response = await fetch("/token", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({username, password}),
      });
      if (!response.ok) {
        // Only the error description is read; a success body (the token) never is.
        let description = "Sign-in failed. Please try again.";
        try {
          description = (await response.json()).error_description || description;
        } catch { /* not JSON */ }
        ui.loginError.textContent = description;
        ui.password.select();
        return;
      }
      ui.password.value = "";
      await showChat(true);
    } catch {
      ui.loginError.textContent = "The server could not be reached. Please try again.";
    } finally {
      ui.loginSubmit.disabled = false;
    }
  }

  async function logout() {
    disconnect();
    try {
      await fetch("/logout", {method: "POST", credentials: "same-origin"});
    } catch { /* the cookie is cleared or expires anyway */ }
    localStorage.removeItem(CLIENT_ID_KEY);
    showLogin();
  }

  async function startNewConversation() {
    disconnect();
    state.clientId = newClientId();
    localStorage.setItem(CLIENT_ID_KEY, state.clientId);
    clearMessages();
    notice("New conversation. Ask anything.");
    state.attempt = 0;
    connect();
    ui.input.focus();
  }

  // Wiring

  ui.loginForm.addEventListener("submit", login);
  ui.composer.addEventListener("submit", (event) => { event.preventDefault(); sendMessage(); });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape" && state.pending.length) {
      event.preventDefault();
      stopReply();
    }
  });
  ui.input.addEventListener("input", autoSize);
  ui.stop.addEventListener("click", stopReply);
  ui.newConversation.addEventListener("click", startNewConversation);
  ui.logout.addEventListener("click", logout);
  window.addEventListener("online", () => { if (state.signedIn && !state.socket) connect(); });

  showChat().catch(() => showLogin("The server could not be reached. Please reload."));
})();
