"""The chat page (``/``) in a real Chromium, against a live server.

Playwright for Python drives Debian's Chromium (``apt-get install chromium``);
no browser is ever downloaded. Without Chromium (or without Playwright) these
tests skip with the reason; with ``CHAT_BROWSER_REQUIRED=1`` (set by .ci/run)
they fail instead (the ``chromium``, ``browser`` and ``page`` fixtures are
conftest.py's).

One server (echo agent, a short pause before each word so that streaming and
stopping can be watched) and one browser serve the whole module; every test
gets a fresh browser context (its own cookies and localStorage). The browser
maps ``localhost:8000`` to the server, so that the spec's JavaScript example,
which hard-codes that address, runs unchanged.
"""

from __future__ import annotations

import json
import re

import pytest

from .helpers import BROWSER_TIMEOUT_MS, expect, log_in, run_axe, screenshot
from .servers import PASSWORD, ROOT, add_users, serving, write_config

pytestmark = pytest.mark.slow

SPEC = ROOT.parent / "shared" / "spec" / "ai-chat-websocket-api.md"
WORD_DELAY = 0.06

# The spec's JavaScript example, verbatim (test_spec_example_is_verbatim checks it).
SPEC_EXAMPLE = """\
const connectToAIChat = async (token, clientId = `client-${Math.random().toString(36).substr(2, 9)}`) => {
  const wsUrl = `ws://localhost:8000/ws/ai/ai-chat/${clientId}?token=${token}`;
  
  const socket = new WebSocket(wsUrl);
  
  socket.onopen = () => {
    console.log('Connected to AI Chat WebSocket');
  };
  
  socket.onmessage = (event) => {
    const data = JSON.parse(event.data);
    console.log('Received:', data);
    
    // Handle different message types
    switch(data.type) {
      case 'system':
        console.log('System:', data.message);
        break;
      case 'ai_response':
        console.log('AI:', data.message);
        break;
      case 'error':
        console.error('Error:', data.message);
        break;
      default:
        console.log('Unknown message type:', data);
    }
  };
  
  socket.onclose = (event) => {
    console.log('Disconnected from AI Chat WebSocket:', event.reason || 'No reason provided');
  };
  
  socket.onerror = (error) => {
    console.error('WebSocket error:', error);
  };
  
  // Function to send a message
  const sendMessage = (content) => {
    if (socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ content }));
      return true;
    }
    return false;
  };
  
  return {
    socket,
    sendMessage,
    close: () => socket.close()
  };
};

// Example usage:
// const chat = await connectToAIChat('your_jwt_token');
// chat.sendMessage('Hello, AI!');
"""


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("browser"),
                          agent={"backend": "echo", "echo": {"delay_seconds": WORD_DELAY}})
    add_users(config, "alice", "bob", "carol")  # carol: the spec example's alone
    with serving(config) as server:
        yield server


# Helpers: every step with the keyboard, as a user without a mouse would.

def logged_in(page, username="alice"):
    log_in(page, username, PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")
    expect(page.locator("#message")).to_be_focused()


def send(page, text):
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")


def last_reply(page):
    return page.locator(".msg-assistant").last


def words(count, stem="word"):
    return " ".join(f"{stem}{i}" for i in range(count))


# The flows

def test_bad_password_shows_an_error(page):
    log_in(page, "alice", "not the password")
    expect(page.locator("#login-error")).to_have_text("Incorrect username or password.")
    expect(page.locator("#chat-view")).to_be_hidden()
    assert not [c for c in page.context.cookies() if c["name"] == "access_token"]


def test_log_in_and_see_a_streamed_reply(page):
    received: list[dict] = []
    sent: list[dict] = []
    page.on("websocket", lambda ws: (
        ws.on("framereceived", lambda payload: received.append(json.loads(payload))),
        ws.on("framesent", lambda payload: sent.append(json.loads(payload))),
    ))
    logged_in(page)
    text = words(12)
    send(page, text)
    reply = last_reply(page).locator(".msg-body")
    # Part of the reply is on screen before the whole of it.
    expect(reply).to_contain_text("Echo: word0")
    partial = reply.text_content()
    expect(reply).to_have_text(f"Echo: {text}")
    assert partial != f"Echo: {text}"
    assert sent[-1] == {"content": text, "stream": True}
    chunks = [f for f in received if f["type"] == "ai_response_chunk"]
    assert len(chunks) == 13
    assert received[-1]["type"] == "ai_response"
    # The token is in an HttpOnly cookie only: never in storage, never readable by script.
    cookie = next(c for c in page.context.cookies() if c["name"] == "access_token")
    assert cookie["httpOnly"]
    assert "access_token" not in page.evaluate("document.cookie")
    assert cookie["value"] not in json.dumps(page.evaluate("({...localStorage})"))


def test_reply_text_is_shown_as_text_not_html(page):
    logged_in(page)
    text = '<img src=x onerror="window.pwned=1"> <b>bold</b>'
    send(page, text)
    expect(last_reply(page).locator(".msg-body")).to_have_text(f"Echo: {text}")
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_stop_a_reply_then_reload_shows_the_history(page):
    logged_in(page)
    send(page, "hello there")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: hello there")
    send(page, words(60))
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word1")
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#stop").click()
    stopped = last_reply(page)
    expect(stopped).to_have_class(re.compile("msg-cancelled"))
    expect(stopped.locator(".msg-meta")).to_contain_text("Stopped")
    expect(page.locator("#stop")).to_be_disabled()
    partial = stopped.locator(".msg-body").text_content()
    assert partial.startswith("Echo: word0") and "word59" not in partial
    client_id = page.evaluate("localStorage.getItem('aiChat.clientId')")

    page.reload()
    bodies = page.locator("#messages .msg-body")
    expect(bodies).to_have_text(["hello there", "Echo: hello there", words(60), partial])
    expect(last_reply(page).locator(".msg-meta")).to_contain_text("Stopped")
    assert page.evaluate("localStorage.getItem('aiChat.clientId')") == client_id


def test_reload_mid_stream_goes_on_where_it_was(page):
    logged_in(page)
    expect(page.locator("#messages")).to_have_attribute("data-protocol", "v2")
    send(page, words(50))
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word3 ")
    page.reload()  # protocol v2: the reply went on at the server meanwhile
    expect(page.locator("#status")).to_have_text("Connected")
    reply = last_reply(page)
    expect(reply).not_to_have_class(re.compile("streaming"), timeout=BROWSER_TIMEOUT_MS * 2)
    # No gap and no repeated text: exactly the reply, then saved as it was shown.
    expect(reply.locator(".msg-body")).to_have_text("Echo: " + words(50))
    expect(page.locator("#messages .msg-body")).to_have_text([words(50), "Echo: " + words(50)])
    page.reload()
    expect(page.locator("#messages .msg-body")).to_have_text([words(50), "Echo: " + words(50)])


def test_stop_works_on_a_reply_resumed_after_a_reload(page):
    logged_in(page, "bob")
    send(page, words(80, "stop"))
    expect(last_reply(page).locator(".msg-body")).to_contain_text("stop2 ")
    page.reload()
    reply = last_reply(page)
    expect(reply.locator(".msg-body")).to_contain_text("stop5 ")
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#stop").click()
    expect(reply).to_have_class(re.compile("msg-cancelled"))
    expect(reply.locator(".msg-meta")).to_contain_text("Stopped")
    partial = reply.locator(".msg-body").text_content()
    assert partial.startswith("Echo: stop0") and "stop79" not in partial
    page.reload()  # saved as it was stopped
    expect(page.locator("#messages .msg-body").last).to_have_text(partial)


def test_the_page_speaks_the_spec_when_v2_is_refused(page):
    """The server answers without the subprotocol (as a spec-only server
    would; here the page's request for it is dropped on the way): the page
    works on v1, streaming and Stop included."""
    page.add_init_script("""
        const Native = window.WebSocket;
        window.WebSocket = class extends Native {
            constructor(url) { super(url); }  // no subprotocol asked for
        };
    """)
    logged_in(page, "bob")
    expect(page.locator("#messages")).to_have_attribute("data-protocol", "v1")
    send(page, "hello")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: hello")
    send(page, words(60, "v1-"))
    expect(last_reply(page).locator(".msg-body")).to_contain_text("v1-2 ")
    page.locator("#stop").click()
    expect(last_reply(page).locator(".msg-meta")).to_contain_text("Stopped")


def test_new_conversation_and_log_out(page, live_server):
    logged_in(page, "bob")
    send(page, "first conversation")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: first conversation")
    first_id = page.evaluate("localStorage.getItem('aiChat.clientId')")
    page.locator("#new-conversation").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg-user")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("Connected")
    assert page.evaluate("localStorage.getItem('aiChat.clientId')") != first_id

    page.locator("#logout").focus()
    with page.expect_response("**/logout") as logout:
        page.keyboard.press("Enter")
    assert logout.value.status == 200
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#username")).to_be_focused()
    expect(page.locator("#session-actions")).to_be_hidden()
    assert not [c for c in page.context.cookies() if c["name"] == "access_token"]
    assert page.request.get(f"/api/conversations/{first_id}/messages").status == 401


def test_reconnects_with_backoff_after_a_drop(page):
    connections = []

    def route(ws):
        server = ws.connect_to_server()
        connections.append((ws, server))

    page.route_web_socket(re.compile(r".*/ws/ai/ai-chat/.*"), route)
    logged_in(page)
    ws, _server = connections[0]
    ws.close(code=1011, reason="Internal error")  # as if the server had dropped
    expect(page.locator("#status")).to_contain_text("Reconnecting")
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#status")).to_have_text("Connected")
    assert len(connections) == 2
    send(page, "still here")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: still here")


def test_rate_limit_and_error_frames_are_shown_readably(page):
    servers = []

    def route(ws):
        server = ws.connect_to_server()
        servers.append(server)

        def from_page(message):
            if json.loads(message).get("content") == "too fast":
                # What the server answers a message over the limit.
                ws.send(json.dumps({"type": "error", "timestamp": "2026-01-01T00:00:00.000000",
                                    "message": "Rate limit exceeded: try again in 2.5 seconds."}))
            else:
                server.send(message)
        ws.on_message(from_page)

    page.route_web_socket(re.compile(r".*/ws/ai/ai-chat/.*"), route)
    logged_in(page)
    send(page, "too fast")
    expect(page.locator(".msg-warning")).to_have_text(
        re.compile(r"Rate limit exceeded: try again in 2\.5 seconds\."))
    expect(page.locator(".msg-assistant")).to_have_count(0)
    expect(page.locator("#stop")).to_be_disabled()
    # A real error frame of the server: a cancel with nothing in flight.
    servers[0].send(json.dumps({"action": "cancel"}))
    expect(page.locator(".msg-error")).to_have_text(
        re.compile("There is no reply in progress to cancel."))
    send(page, "and now slowly")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: and now slowly")


def test_keyboard_only_focus_order_and_visible_focus(page):
    logged_in(page)
    page.locator("#message").type("typed with the keyboard")
    order = []
    page.locator("#new-conversation").focus()
    for _ in range(5):
        order.append(page.evaluate("document.activeElement.id"))
        page.keyboard.press("Tab")
    # Stop is disabled with nothing in flight, so it is skipped.
    assert order == ["new-conversation", "memory-toggle", "logout", "message", "send"]
    page.locator("#logout").focus()
    page.keyboard.press("Shift+Tab")
    outline = page.evaluate(
        "getComputedStyle(document.activeElement).outlineStyle + ' '"
        " + getComputedStyle(document.activeElement).outlineWidth")
    assert outline.startswith("solid") and outline != "solid 0px"
    # Escape in the message box stops the reply in flight.
    page.locator("#message").focus()
    send(page, words(60))
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word1")
    page.keyboard.press("Escape")
    expect(last_reply(page).locator(".msg-meta")).to_contain_text("Stopped")


def test_accessibility_no_axe_violations(page, tmp_path):
    page.goto("/")
    expect(page.locator("#login-view")).to_be_visible()
    assert run_axe(page) == []
    screenshot(page, "login.png", tmp_path)
    log_in(page, "alice", PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")
    send(page, "Is this page accessible?")
    expect(last_reply(page).locator(".msg-body")).to_have_text("Echo: Is this page accessible?")
    assert run_axe(page) == []


def test_screenshot_of_the_chat_page(page, tmp_path):
    logged_in(page)
    send(page, "Hello! Can you stream your answer word by word?")
    expect(last_reply(page).locator(".msg-body")).to_contain_text("word?")
    send(page, "Tell me a long story about a lighthouse keeper and the sea, the storms "
               "she saw, the ships she guided home, and the gulls that kept her company "
               "through every winter night on the rock")
    expect(last_reply(page).locator(".msg-body")).to_contain_text("keeper")
    page.locator("#stop").click()
    expect(last_reply(page)).to_have_class(re.compile("msg-cancelled"))
    send(page, "Thanks, that is enough for now.")
    expect(last_reply(page).locator(".msg-body")).to_have_text(
        "Echo: Thanks, that is enough for now.")
    page.locator("#message").fill("What does the stop button do?")
    page.locator("#message").blur()
    assert screenshot(page, "chat.png", tmp_path).stat().st_size > 10_000


def test_spec_javascript_example_runs_unchanged_in_the_page(page):
    page.goto("http://localhost:8000/")  # the example's own address, mapped to the server
    lines: list[str] = []
    page.on("console", lambda message: lines.append(message.text))
    token = page.evaluate("""async (password) => {
        const response = await fetch("/token", {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({username: "carol", password})});
        return (await response.json()).access_token;
    }""", PASSWORD)
    page.evaluate("async (token) => {\n" + SPEC_EXAMPLE + "\nwindow.chat = await connectToAIChat(token);\n}",
                  token)
    # Waits on what the example's own handlers log, not on a polled readyState:
    # a poll can miss a short-lived OPEN, and these lines say why a socket closed.
    _wait_for(page, lambda: "Connected to AI Chat WebSocket" in lines
              or any(line.startswith("Disconnected") for line in lines), lines)
    _wait_for(page, lambda: any(line.startswith("System: Welcome to AI Chat, carol!")
                                for line in lines), lines)
    assert page.evaluate("window.chat.sendMessage('Hello, AI!')") is True, lines
    _wait_for(page, lambda: "AI: Echo: Hello, AI!" in lines, lines)
    page.evaluate("window.chat.close()")


def test_spec_example_is_verbatim():
    if not SPEC.exists():
        pytest.skip(f"{SPEC} not present")
    block = re.search(r"```javascript\n(.*?)```", SPEC.read_text(), re.S).group(1)
    assert block == SPEC_EXAMPLE


def _wait_for(page, condition, lines, timeout_ms=BROWSER_TIMEOUT_MS):
    """Poll a Python condition while letting the page's events arrive."""
    waited = 0
    while not condition():
        assert waited < timeout_ms, f"timed out; the page's console: {lines}"
        page.wait_for_timeout(50)
        waited += 50
