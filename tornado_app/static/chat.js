// The chat page: sign in, stream replies over the WebSocket, stop, history,
// new conversation, reconnect with backoff, log out; over protocol v2 also
// thumbs up/down, regenerate, edit, versions (< 2 / 3 >) and the agent picker.
// No framework, no build.
//
// It speaks protocol v2 (subprotocol ai-chat.v2, docs/protocol.md) when the
// server does: replies carry ids, so a reply in flight survives a reload or a
// dropped connection (the page resumes it where it was, chunk by chunk), and
// Stop cancels a reply by its id. Against a server that only speaks the
// spec it falls back to v1: a dropped connection then ends the reply.
//
// The access token lives only in the HttpOnly cookie set by POST /token: this
// script never reads or stores it. Every text from the server or the user is
// put into the page with textContent, never as HTML.
"use strict";

(() => {
  const CLIENT_ID_KEY = "aiChat.clientId";
  const SUBPROTOCOL = "ai-chat.v2";
  const CANCELLED_TEXT = "The reply was cancelled.";
  const IN_PROGRESS_TEXT = "A reply is in progress.";
  const NOTHING_TO_CANCEL = "There is no reply in progress to cancel.";
  const UNKNOWN_REPLY = "There is no such reply of yours.";
  const FEEDBACK_TEXT = "Thanks for your feedback.";
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 30000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), actions: $("session-actions"),
    loginView: $("login-view"), loginForm: $("login-form"), loginError: $("login-error"),
    username: $("username"), password: $("password"), loginSubmit: $("login-submit"),
    chatView: $("chat-view"), messages: $("messages"), composer: $("composer"),
    input: $("message"), send: $("send"), stop: $("stop"),
    newConversation: $("new-conversation"), logout: $("logout"), quotaLeft: $("quota-left"),
    agent: $("agent"), agentField: $("agent-field"),
  };

  const state = {
    socket: null,
    v2: false,          // the server speaks protocol v2 on this socket
    clientId: null,
    pending: [],        // replies awaiting their end, in the order sent: {item, id, seq}
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

  // A reply awaiting its end: its bubble, its id (v2, once the server has
  // acknowledged the message) and the last chunk shown.
  function startReply(id = null, branched = false) {
    const item = addBubble("assistant", "", {note: "Thinking…"});
    item.classList.add("streaming");
    ui.messages.setAttribute("aria-busy", "true");
    const reply = {item, id, seq: -1, branched};
    state.pending.push(reply);
    updateButtons();
    markLastReply();
    return reply;
  }

  // The reply a frame is about: by its id (v2), else the oldest one.
  function replyFor(frame) {
    if (frame.reply_id) return state.pending.find((r) => r.id === frame.reply_id) || null;
    return state.pending[0] || null;
  }

  // A refused message (rate limit, queue full) has no id: it is the oldest
  // reply the server has not acknowledged yet.
  function unacknowledgedReply() {
    return state.pending.find((r) => r.id === null) || null;
  }

  function finishReply(reply, outcome, text, time) {
    if (!reply) return false;
    state.pending.splice(state.pending.indexOf(reply), 1);
    const item = reply.item;
    item.classList.remove("streaming");
    const body = item.querySelector(".msg-body");
    if (outcome === "ok") {
      body.textContent = text;
      setMeta(item, "", time);
      if (reply.id) addControls(item, {id: reply.id, role: "assistant", siblings: []});
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
    refreshQuota();
    if (reply.branched && !state.pending.length) refreshHistory();  // show its versions
    else markLastReply();
    return true;
  }

  function appendChunk(reply, frame) {
    if (!reply) return;
    if (typeof frame.seq === "number") {
      if (frame.seq <= reply.seq) return;  // already shown (a resume overlaps)
      reply.seq = frame.seq;
    }
    const item = reply.item;
    item.querySelector(".msg-body").textContent += frame.message;
    setMeta(item, "Writing…", "");
    scrollToEnd();
  }

  // v2: one quiet line per tool call under the reply ("Used clock"),
  // expandable to the arguments the model gave. Results are never sent.
  // A resume may send again a call this page has shown: it is shown once.
  // ``toolFrames`` counts the tool frames shown, for a resume's tools_seen.
  function showToolCall(reply, frame) {
    if (!reply || (reply.tools && reply.tools.has(String(frame.call_id)))) return;
    reply.toolFrames = (reply.toolFrames || 0) + 1;
    let list = reply.item.querySelector(".msg-tools");
    if (!list) {
      list = document.createElement("div");
      list.className = "msg-tools";
      reply.item.insertBefore(list, reply.item.querySelector(".msg-meta"));
    }
    const step = document.createElement("details");
    step.className = "msg-tool";
    const summary = document.createElement("summary");
    const args = document.createElement("pre");
    args.textContent = JSON.stringify(frame.arguments || {}, null, 2);
    step.append(summary, args);
    list.append(step);
    reply.tools = reply.tools || new Map();
    reply.tools.set(String(frame.call_id), {step, name: String(frame.name), args: frame.arguments});
    summary.textContent = toolLine(String(frame.name), frame.arguments, null);
    scrollToEnd();
  }

  function showToolResult(reply, frame) {
    const tool = reply && reply.tools && reply.tools.get(String(frame.call_id));
    if (!tool || tool.step.dataset.ok !== undefined) return;
    reply.toolFrames += 1;
    tool.step.dataset.ok = String(frame.ok === true);
    tool.step.querySelector("summary").textContent = toolLine(tool.name, tool.args, frame.ok === true);
  }

  // A saved reply's tool steps (the history API), as they were shown live.
  function showToolSteps(item, steps) {
    const reply = {item};
    for (const step of steps) {
      showToolCall(reply, step);
      showToolResult(reply, step);
    }
  }

  function toolLine(name, args, ok) {
    const values = Object.values(args || {})
      .filter((v) => typeof v === "string" || typeof v === "number").join(", ");
    const what = values ? ": " + (values.length > 60 ? values.slice(0, 59) + "…" : values) : "";
    if (ok === null) return `Using ${name}${what}…`;
    return ok ? `Used ${name}${what}` : `Tried ${name}${what} (it failed)`;
  }

  // The connection dropped. v1: every reply in flight is lost to this page.
  // v2: the replies go on at the server; those with an id are resumed after
  // the reconnect, only those never acknowledged are given up.
  function interruptReplies() {
    const kept = [];
    for (const reply of state.pending) {
      if (state.v2 && reply.id !== null) {
        setMeta(reply.item, "Reconnecting…", "");
        kept.push(reply);
        continue;
      }
      const item = reply.item;
      item.classList.remove("streaming");
      item.classList.add("msg-cancelled");
      const body = item.querySelector(".msg-body");
      if (!body.textContent) body.textContent = "(no reply)";
      setMeta(item, "Interrupted: the connection was lost", "");
    }
    state.pending = kept;
    if (!kept.length) ui.messages.removeAttribute("aria-busy");
  }

  // v2, on a new socket: ask for what each known reply missed meanwhile.
  function resumeReplies() {
    for (const reply of state.pending) {
      state.socket.send(JSON.stringify({action: "resume", reply_id: reply.id,
                                        after_seq: reply.seq,
                                        tools_seen: reply.toolFrames || 0}));
    }
  }

  // v2: the server says a reply of this conversation is in flight (after a
  // reload, the page knows nothing of it): show it and resume it from the start.
  function adoptReply(frame) {
    if (!frame.reply_id || state.pending.some((r) => r.id === frame.reply_id)) return;
    startReply(frame.reply_id);
    state.socket.send(JSON.stringify({action: "resume", reply_id: frame.reply_id,
                                      after_seq: -1}));
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
    const socket = new WebSocket(url, [SUBPROTOCOL]);  // the cookie authenticates it
    state.socket = socket;
    setStatus(state.attempt ? "Reconnecting…" : "Connecting…", "busy");
    socket.onopen = () => {
      if (state.socket !== socket) return;
      // An empty protocol: the server speaks the spec only (v1).
      state.v2 = socket.protocol === SUBPROTOCOL;
      ui.messages.dataset.protocol = state.v2 ? "v2" : "v1";
      updateButtons();
    };
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
      case "ack": {
        const reply = unacknowledgedReply();
        if (reply) {
          reply.id = frame.reply_id;
          reply.item.dataset.id = frame.reply_id;
          const asked = reply.item.previousElementSibling;
          if (asked && asked.classList.contains("msg-user") && !asked.dataset.id) {
            asked.dataset.id = frame.message_id;
            addControls(asked, {id: frame.message_id, role: "user", siblings: []});
          }
        }
        break;
      }
      case "system":
        if (Array.isArray(frame.selectable)) {
          showAgents(frame.agent, frame.selectable);  // v2: the conversation's agent
        } else if (Array.isArray(frame.path)) {
          refreshHistory();  // switched branches: show the active one
        } else if (message === FEEDBACK_TEXT || frame.agent) {
          // Feedback taken (the pressed thumb shows it) or the agent chosen (the
          // picker shows it); an agent that went away is a notice (below).
          if (message !== FEEDBACK_TEXT && message.includes("no longer")) notice(message);
          if (frame.agent && ui.agent.value !== frame.agent) ui.agent.value = frame.agent;
        } else if (message === CANCELLED_TEXT) {
          finishReply(replyFor(frame), "cancelled", "", frame.timestamp);
        } else if (message === IN_PROGRESS_TEXT) {
          adoptReply(frame);
        } else if (message.startsWith("Welcome")) {
          state.attempt = 0;
          setStatus("Connected", "ok");
          if (state.v2) resumeReplies();
        } else {
          notice(message);
        }
        break;
      case "ai_response_chunk":
        appendChunk(replyFor(frame), frame);
        break;
      case "tool_call":
        showToolCall(replyFor(frame), frame);
        break;
      case "tool_result":
        showToolResult(replyFor(frame), frame);
        break;
      case "ai_response":
        finishReply(replyFor(frame), "ok", message, frame.timestamp);
        break;
      case "error": {
        // A reply that failed names itself (v2); a refused message does not.
        const reply = frame.reply_id ? replyFor(frame)
          : [NOTHING_TO_CANCEL, UNKNOWN_REPLY].includes(message) ? null
          : state.v2 ? unacknowledgedReply() : state.pending[0];
        if (!reply) {
          notice(message, "error");
        } else {
          const refused = message.startsWith("Rate limit") || message.includes("quota reached");
          finishReply(reply, refused ? "rate" : "error", message);
        }
        break;
      }
    }
  }

  // The agent picker (conversation controls, docs/protocol.md): shown only
  // when more than one agent is selectable.
  function showAgents(current, selectable) {
    ui.agent.replaceChildren(...selectable.map((name) => new Option(name, name, false,
                                                                    name === current)));
    ui.agentField.hidden = selectable.length < 2;
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
      // v2: by id, which also stops a reply this socket did not ask for (one
      // resumed after a reload). v1: the socket's own reply.
      const reply = state.pending.find((r) => r.id !== null);
      state.socket.send(JSON.stringify(state.v2 && reply
        ? {action: "cancel", reply_id: reply.id} : {action: "cancel"}));
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
      item.dataset.id = row.id;
      if (row.status === "cancelled") {
        item.classList.add("msg-cancelled");
        setMeta(item, "Stopped", row.created_at);
      }
      if (row.status !== "error") addControls(item, row);
      showToolSteps(item, row.tool_steps || []);
    }
    markLastReply();
    if (!body.messages.length) {
      notice("New conversation. Ask anything.");
    }
    return true;
  }

  // Quotas: what is left, once less than a fifth of a limit remains

  const QUOTA_SHOWN_BELOW = 0.2;

  function quotaLeftText(usage) {
    const limits = usage.limits || {};
    const windows = [
      [usage.tokens_today, limits.tokens_per_day, "tokens left today", usage.resets.day],
      [usage.tokens_month, limits.tokens_per_month, "tokens left this month", usage.resets.month],
      [usage.cost_month, limits.cost_per_month, `${usage.currency} left this month`,
       usage.resets.month],
    ];
    let lowest = null;
    for (const [used, limit, what, resets] of windows) {
      if (limit === null || limit === undefined) continue;
      const left = Math.max(limit - used, 0);
      const share = limit > 0 ? left / limit : 0;
      if (share < QUOTA_SHOWN_BELOW && (!lowest || share < lowest.share)) {
        const amount = what.startsWith("tokens") ? String(Math.floor(left)) : left.toFixed(2);
        const when = new Date(resets).toLocaleString([], {dateStyle: "medium", timeStyle: "short"});
        lowest = {share, text: `${amount} ${what} (resets ${when}).`};
      }
    }
    return lowest ? lowest.text : "";
  }

  async function refreshQuota() {
    try {
      const response = await fetch("/api/me/usage",
        {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (!response.ok) return;
      const text = quotaLeftText(await response.json());
      ui.quotaLeft.textContent = text;
      ui.quotaLeft.hidden = !text;
    } catch {
      // Not worth a notice: the next reply tries again.
    }
  }

  // Conversation controls (v2): thumbs up/down with a comment, regenerate the
  // last reply, edit a message, move between versions, choose the agent.

  function controlButton(label, text, onClick, extra = {}) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "control";
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.title = label;
    for (const [key, value] of Object.entries(extra)) button.setAttribute(key, value);
    button.addEventListener("click", onClick);
    return button;
  }

  function addControls(item, row) {
    if (!state.v2 && state.socket) return;  // v1: the spec has no controls
    item.querySelector(".msg-actions")?.remove();
    const bar = document.createElement("div");
    bar.className = "msg-actions";
    const siblings = row.siblings || [];
    if (siblings.length > 1) bar.append(siblingNav(row.id, siblings));
    if (row.role === "user") {
      bar.append(controlButton("Edit this message", "Edit", () => startEdit(item)));
    } else {
      const rating = row.feedback ? row.feedback.rating : 0;
      bar.append(
        controlButton("Good reply", "▲ Good", () => rate(item, 1), {"aria-pressed": String(rating === 1),
                                                             "data-rating": "1"}),
        controlButton("Bad reply", "▼ Bad", () => rate(item, -1), {"aria-pressed": String(rating === -1),
                                                             "data-rating": "-1"}),
        controlButton("Regenerate this reply", "↻ Regenerate", () => regenerate(item),
                      {"data-regenerate": ""}));
    }
    item.append(bar);
  }

  function siblingNav(id, siblings) {
    const nav = document.createElement("span");
    nav.className = "siblings";
    const at = siblings.indexOf(id);
    const go = (index) => () => send({action: "switch", message_id: siblings[index]});
    const previous = controlButton("Previous version", "‹", go(at - 1));
    previous.disabled = at <= 0;
    const next = controlButton("Next version", "›", go(at + 1));
    next.disabled = at >= siblings.length - 1;
    const where = document.createElement("span");
    where.className = "sibling-count";
    where.textContent = `${at + 1} / ${siblings.length}`;
    nav.append(previous, where, next);
    return nav;
  }

  // Regenerate is offered on the last reply only.
  function markLastReply() {
    const replies = ui.messages.querySelectorAll(".msg-assistant");
    replies.forEach((reply, index) => {
      const button = reply.querySelector("[data-regenerate]");
      if (button) button.hidden = index !== replies.length - 1 || state.pending.length > 0;
    });
  }

  function send(frame) {
    if (!socketOpen() || !state.v2) return false;
    state.socket.send(JSON.stringify(frame));
    return true;
  }

  function rate(item, rating) {
    const pressed = item.querySelector(`[data-rating="${rating}"]`);
    const value = pressed.getAttribute("aria-pressed") === "true" ? 0 : rating;  // again: undo
    if (!send({action: "feedback", reply_id: item.dataset.id, rating: value})) return;
    for (const button of item.querySelectorAll("[data-rating]")) {
      button.setAttribute("aria-pressed", String(Number(button.dataset.rating) === value));
    }
    item.querySelector(".feedback-form")?.remove();
    if (value !== 0) item.append(commentForm(item, value));
  }

  function commentForm(item, rating) {
    const form = document.createElement("form");
    form.className = "feedback-form";
    const input = document.createElement("input");
    input.maxLength = 1000;
    input.placeholder = "Add a comment (optional)";
    input.setAttribute("aria-label", "Comment on this reply");
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "button ghost";
    save.textContent = "Send comment";
    form.append(input, save);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (send({action: "feedback", reply_id: item.dataset.id, rating,
                comment: input.value.trim() || null})) form.remove();
    });
    return form;
  }

  // Everything after ``item`` belongs to the branch being replaced.
  function dropAfter(item) {
    while (item.nextElementSibling) item.nextElementSibling.remove();
  }

  function regenerate(item) {
    if (state.pending.length || !send({action: "regenerate", reply_id: item.dataset.id,
                                        stream: true})) return;
    dropAfter(item);
    item.remove();
    startReply(null, true);
  }

  function startEdit(item) {
    if (item.querySelector(".edit-form")) return;
    const body = item.querySelector(".msg-body");
    const form = document.createElement("form");
    form.className = "edit-form";
    const box = document.createElement("textarea");
    box.value = body.textContent;
    box.maxLength = 4000;
    box.setAttribute("aria-label", "Edit your message");
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "button primary";
    save.textContent = "Save and send";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "button ghost";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", () => form.remove());
    form.append(box, save, cancel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const content = box.value.trim();
      if (!content || state.pending.length) return;
      if (!send({action: "edit", message_id: item.dataset.id, content, stream: true})) return;
      dropAfter(item);
      item.remove();
      addBubble("user", content, {time: new Date().toISOString()});
      startReply(null, true);
    });
    item.append(form);
    box.focus();
  }

  async function refreshHistory() {
    if (state.pending.length) return;
    try {
      await loadHistory();
    } catch { /* the history stays as shown */ }
  }

  function chooseAgent() {
    send({action: "use_agent", agent: ui.agent.value});
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
    refreshQuota();
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
  ui.agent.addEventListener("change", chooseAgent);
  window.addEventListener("online", () => { if (state.signedIn && !state.socket) connect(); });

  showChat().catch(() => showLogin("The server could not be reached. Please reload."));
})();
