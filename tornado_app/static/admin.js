// The operator dashboard (/admin). No framework, no build; charts by the
// vendored Chart.js (static/vendor/chartjs).
//
// The server picks the view (body[data-view]): "login", "forbidden" or
// "dashboard"; signing in or out reloads the page so that it picks again.
// The token lives only in the HttpOnly cookie set by POST /token: this script
// never reads it. The dashboard reads GET /api/admin/analytics/{report} with
// the filters of the page's URL (?since=&until=&agent=), so a view can be
// bookmarked. Text from the server is only ever set as text, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Signing in and out

  function setUpLogin() {
    const form = $("login-form");
    const error = $("login-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const username = $("username").value.trim();
      const password = $("password").value;
      if (!username || !password) {
        error.textContent = "Enter your username and password.";
        return;
      }
      error.textContent = "";
      $("login-submit").disabled = true;
      try {
        const response = await fetch("/token", {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json"},
          body: JSON.stringify({username, password}),
        });
        if (response.ok) {
          location.reload();  // the server now shows the dashboard, or the refusal
          return;
        }
        error.textContent = response.status === 401
          ? "Incorrect username or password." : `Could not sign in (HTTP ${response.status}).`;
      } catch {
        error.textContent = "The server could not be reached. Try again in a moment.";
      }
      $("login-submit").disabled = false;
      $("password").focus();
    });
  }

  async function logout() {
    try {
      await fetch("/logout", {method: "POST", credentials: "same-origin"});
    } finally {
      location.reload();
    }
  }

  // Formatting, in the reader's locale

  const numbers = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
  const compactNumbers = new Intl.NumberFormat(undefined,
    {notation: "compact", maximumFractionDigits: 1});
  const percents = new Intl.NumberFormat(undefined,
    {style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 2});
  const decimals = new Intl.NumberFormat(undefined, {maximumFractionDigits: 2});
  const oneDecimal = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
  const shortDays = new Intl.DateTimeFormat(undefined,
    {month: "short", day: "numeric", timeZone: "UTC"});
  const longDays = new Intl.DateTimeFormat(undefined,
    {year: "numeric", month: "short", day: "numeric", timeZone: "UTC"});

  const missing = (value) => value === null || value === undefined;
  const count = (value) => (missing(value) ? "—" : numbers.format(value));
  const compact = (value) => (missing(value) ? "—" : compactNumbers.format(value));
  const percent = (value) => (missing(value) ? "—" : percents.format(value));

  function duration(ms) {
    if (missing(ms)) return "—";
    if (ms < 1000) return `${numbers.format(ms)} ms`;
    return `${(ms < 10000 ? decimals : oneDecimal).format(ms / 1000)} s`;
  }

  // Report days are UTC dates ("2025-10-31"): shown as that date, wherever the reader is.
  const utcDay = (iso) => new Date(`${iso}T00:00:00Z`);
  const shortDay = (iso) => shortDays.format(utcDay(iso));
  const longDay = (iso) => longDays.format(utcDay(iso));
  const isoDay = (date) => date.toISOString().slice(0, 10);

  function addDays(iso, days) {
    const date = utcDay(iso);
    date.setUTCDate(date.getUTCDate() + days);
    return isoDay(date);
  }

  // Filters: the URL is the source of truth

  const DATE = /^\d{4}-\d\d-\d\d$/;
  const LAST_DAYS = /^(\d{1,4})d$/;
  const DEFAULT_SINCE = "30d";

  function readFilters() {
    const query = new URLSearchParams(location.search);
    return {
      since: query.get("since") || DEFAULT_SINCE,  // "30d", "all" or a date
      until: query.get("until") || "",
      agent: query.get("agent") || "",
    };
  }

  function writeFilters(filters) {
    const query = new URLSearchParams();
    if (filters.since !== DEFAULT_SINCE) query.set("since", filters.since);
    if (filters.until) query.set("until", filters.until);
    if (filters.agent) query.set("agent", filters.agent);
    const search = query.toString();
    history.pushState(null, "", search ? `?${search}` : location.pathname);
  }

  /** The first day of the range as a date, or "" for all time. "7d" is today and the 6 before. */
  function sinceDay(since) {
    const last = LAST_DAYS.exec(since);
    if (last) return addDays(isoDay(new Date()), 1 - Number(last[1]));
    return since === "all" ? "" : since;
  }

  function apiQuery(filters, extra = {}) {
    const query = new URLSearchParams();
    const since = sinceDay(filters.since);
    if (since) query.set("since", since);
    if (filters.until) query.set("until", filters.until);
    if (filters.agent) query.set("agent", filters.agent);
    for (const [name, value] of Object.entries(extra)) query.set(name, value);
    return query;
  }

  function describeRange(filters) {
    const last = LAST_DAYS.exec(filters.since);
    let range;
    if (last && !filters.until) range = `Last ${last[1]} days`;
    else if (filters.since === "all" && !filters.until) range = "All time";
    else {
      const since = sinceDay(filters.since);
      range = `${since ? longDay(since) : "The beginning"} to ${
        filters.until ? longDay(filters.until) : "now"}`;
    }
    return `${range} · ${filters.agent || "all agents"} · days are UTC`;
  }

  // The API

  class ApiError extends Error {
    constructor(status, description) {
      super(description || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function report(name, query, signal) {
    const response = await fetch(`/api/admin/analytics/${name}?${query}`,
      {credentials: "same-origin", signal, headers: {Accept: "application/json"}});
    if (!response.ok) {
      let description = "";
      try {
        description = (await response.json()).error_description;
      } catch {
        // not JSON: the status says enough
      }
      throw new ApiError(response.status, description);
    }
    return response.json();
  }

  // Charts

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  const charts = new Map();  // card id -> Chart

  function cardParts(id) {
    const card = $(id);
    return {card, canvas: card.querySelector("canvas"),
            empty: card.querySelector(".empty"), table: card.querySelector("table")};
  }

  /** Draw a chart in card ``id``, or its empty state when ``config`` is null. */
  function draw(id, config, summary, table, emptyText = "No data in this range") {
    const parts = cardParts(id);
    charts.get(id)?.destroy();
    charts.delete(id);
    parts.empty.textContent = emptyText;
    parts.empty.hidden = config !== null;
    parts.canvas.hidden = config === null;
    parts.canvas.setAttribute("aria-label", config === null ? emptyText : summary);
    fillTable(parts.table, table);
    if (config !== null) charts.set(id, new Chart(parts.canvas, config));
  }

  /** The chart's data as a table (visually hidden; read by screen readers). */
  function fillTable(table, {caption, columns, rows}) {
    const head = document.createElement("tr");
    for (const name of columns) {
      const cell = document.createElement("th");
      cell.scope = "col";
      cell.textContent = name;
      head.append(cell);
    }
    const body = document.createElement("tbody");
    for (const {key, cells} of rows) {
      const row = document.createElement("tr");
      row.dataset.key = key;
      cells.forEach((text, index) => {
        const cell = document.createElement(index === 0 ? "th" : "td");
        if (index === 0) cell.scope = "row";
        cell.textContent = text;
        row.append(cell);
      });
      body.append(row);
    }
    const title = document.createElement("caption");
    title.textContent = caption;
    const thead = document.createElement("thead");
    thead.append(head);
    table.replaceChildren(title, thead, body);
  }

  const LEGEND_LABELS = {boxWidth: 10, boxHeight: 10, useBorderRadius: true, borderRadius: 3,
                         padding: 8, font: {size: 11.5}};

  function baseOptions({yFormat = compact, stacked = false, horizontal = false} = {}) {
    const valueAxis = {
      beginAtZero: true, stacked,
      ticks: {callback: (value) => yFormat(value), maxTicksLimit: 6},
      grid: {color: css("--border")},
      border: {display: false},
    };
    const categoryAxis = {stacked, grid: {display: false},
                          ticks: {maxRotation: 0, autoSkipPadding: 12}};
    return {
      responsive: true, maintainAspectRatio: false,
      animation: matchMedia("(prefers-reduced-motion: reduce)").matches ? false : {duration: 300},
      indexAxis: horizontal ? "y" : "x",
      interaction: {mode: "index", intersect: false},
      plugins: {
        legend: {position: "bottom", labels: LEGEND_LABELS},
        tooltip: {callbacks: {label: (item) => ` ${item.dataset.label}: ${yFormat(item.raw)}`}},
      },
      scales: horizontal ? {x: valueAxis, y: categoryAxis} : {x: categoryAxis, y: valueAxis},
    };
  }

  function bars(label, data, color, extra = {}) {
    return {label, data, backgroundColor: color, borderRadius: 4, maxBarThickness: 28, ...extra};
  }

  function line(label, data, color, {area = false} = {}) {
    return {label, data, borderColor: color, backgroundColor: color, pointRadius: 2,
            pointHoverRadius: 4, borderWidth: 2, cubicInterpolationMode: "monotone",
            spanGaps: false, fill: area ? {target: "origin", above: `${color}22`} : false};
  }

  /** The report's days, with the days in range that had nothing filled in as empty ones. */
  function everyDay(rows, filters) {
    const byDay = new Map(rows.map((row) => [row.day, row]));
    const today = isoDay(new Date());
    let first = sinceDay(filters.since) || rows[0]?.day;
    let last = filters.until && filters.until < today ? filters.until : today;
    if (!rows.length) return [];
    if (rows[0].day < first) first = rows[0].day;
    if (rows[rows.length - 1].day > last) last = rows[rows.length - 1].day;
    const days = [];
    for (let day = first; day <= last && days.length < 3660; day = addDays(day, 1)) {
      days.push(byDay.get(day) || {day, messages: 0, user_messages: 0, replies: 0, errors: 0,
                                   error_rate: null, tokens_in: 0, tokens_out: 0});
    }
    return days;
  }

  function peak(rows, key) {
    return rows.reduce((best, row) => (best && best[key] >= row[key] ? best : row), null);
  }

  function drawMessages(days) {
    const total = days.reduce((sum, row) => sum + row.messages, 0);
    const busiest = peak(days, "messages");
    const table = {
      caption: "Messages per day (UTC)",
      columns: ["Day", "Messages", "Questions", "Replies"],
      rows: days.map((row) => ({key: row.day, cells: [
        longDay(row.day), count(row.messages), count(row.user_messages), count(row.replies)]})),
    };
    if (!total) return draw("chart-messages", null, "", table);
    const options = baseOptions({stacked: true});
    options.plugins.tooltip.callbacks.footer = (items) =>
      `Total: ${count(items.reduce((sum, item) => sum + item.raw, 0))}`;
    draw("chart-messages", {
      type: "bar",
      data: {labels: days.map((row) => shortDay(row.day)), datasets: [
        bars("Questions", days.map((row) => row.user_messages), css("--series-1")),
        bars("Replies", days.map((row) => row.replies), css("--series-2")),
      ]},
      options,
    }, `Messages per day: ${count(total)} over ${days.length} days; the busiest was ` +
       `${longDay(busiest.day)} with ${count(busiest.messages)}.`, table);
  }

  function drawErrorRate(days) {
    const withReplies = days.filter((row) => row.replies);
    const worst = peak(withReplies.map((row) => ({...row, rate: row.error_rate})), "rate");
    const table = {
      caption: "Error rate per day (UTC)",
      columns: ["Day", "Error rate", "Failed replies", "Replies"],
      rows: days.map((row) => ({key: row.day, cells: [longDay(row.day), percent(row.error_rate),
                                                      count(row.errors), count(row.replies)]})),
    };
    if (!withReplies.length) return draw("chart-errors", null, "", table);
    const options = baseOptions({yFormat: percent});
    options.plugins.legend.display = false;
    draw("chart-errors", {
      type: "line",
      data: {labels: days.map((row) => shortDay(row.day)), datasets: [
        line("Error rate", days.map((row) => row.error_rate), css("--series-6"), {area: true}),
      ]},
      options,
    }, `Error rate per day, highest on ${longDay(worst.day)} at ${percent(worst.rate)}.`, table);
  }

  function drawTokens(days) {
    const totalIn = days.reduce((sum, row) => sum + row.tokens_in, 0);
    const totalOut = days.reduce((sum, row) => sum + row.tokens_out, 0);
    const table = {
      caption: "Tokens per day (UTC)",
      columns: ["Day", "Tokens in", "Tokens out"],
      rows: days.map((row) => ({key: row.day, cells: [longDay(row.day), count(row.tokens_in),
                                                      count(row.tokens_out)]})),
    };
    if (!totalIn && !totalOut) return draw("chart-tokens", null, "", table);
    draw("chart-tokens", {
      type: "line",
      data: {labels: days.map((row) => shortDay(row.day)), datasets: [
        line("Tokens in", days.map((row) => row.tokens_in), css("--series-1"), {area: true}),
        line("Tokens out", days.map((row) => row.tokens_out), css("--series-3"), {area: true}),
      ]},
      options: baseOptions(),
    }, `Tokens per day: ${compact(totalIn)} in and ${compact(totalOut)} out in total.`, table);
  }

  function drawLatency(agents) {
    const rows = agents.filter((row) => !missing(row.latency_p50_ms));
    const table = {
      caption: "Latency by agent and model",
      columns: ["Agent", "Replies", "Latency p50", "Latency p95", "First token p50",
                "First token p95"],
      rows: agents.map((row) => ({key: `${row.agent}/${row.model}`, cells: [
        `${row.agent} · ${row.model}`, count(row.replies), duration(row.latency_p50_ms),
        duration(row.latency_p95_ms), duration(row.ttft_p50_ms), duration(row.ttft_p95_ms)]})),
    };
    if (!rows.length) return draw("chart-latency", null, "", table, "No replies in this range");
    const slowest = peak(rows, "latency_p95_ms");
    const thick = {barPercentage: 1, categoryPercentage: .86};
    draw("chart-latency", {
      type: "bar",
      data: {labels: rows.map((row) => [row.agent, row.model]), datasets: [
        bars("Reply p50", rows.map((row) => row.latency_p50_ms), css("--series-1"), thick),
        bars("Reply p95", rows.map((row) => row.latency_p95_ms), css("--series-2"), thick),
        bars("1st token p50", rows.map((row) => row.ttft_p50_ms), css("--series-3"), thick),
        bars("1st token p95", rows.map((row) => row.ttft_p95_ms), css("--series-4"), thick),
      ]},
      options: latencyOptions(rows),
    }, `Latency by agent for ${rows.length} agent and model pairs; the slowest at p95 is ` +
       `${slowest.agent} ${slowest.model} with ${duration(slowest.latency_p95_ms)}.`, table);
  }

  /** Bars along, so that every agent and model can be named in full, on two lines. */
  function latencyOptions(rows) {
    const options = baseOptions({yFormat: duration, horizontal: true});
    options.scales.y.ticks.autoSkip = false;
    options.scales.y.ticks.callback = (_value, index) => [rows[index].agent, rows[index].model];
    options.scales.y.ticks.font = {size: 11};
    options.plugins.tooltip.callbacks.title = (items) =>
      `${rows[items[0].dataIndex].agent} · ${rows[items[0].dataIndex].model}`;
    return options;
  }

  function drawUsers(users) {
    const table = {
      caption: "Top users by messages",
      columns: ["User", "Messages", "Conversations", "Tokens in", "Tokens out", "Cost"],
      rows: users.map((row) => ({key: row.username, cells: [row.username, count(row.messages),
        count(row.conversations), count(row.tokens_in), count(row.tokens_out),
        money(row.cost)]})),
    };
    if (!users.length) return draw("chart-users", null, "", table);
    const options = baseOptions({horizontal: true});
    options.plugins.legend.display = false;
    options.scales.y.ticks.autoSkip = false;
    draw("chart-users", {
      type: "bar",
      data: {labels: users.map((row) => row.username), datasets: [
        bars("Messages", users.map((row) => row.messages), css("--series-1"),
             {maxBarThickness: 14}),
      ]},
      options,
    }, `Top ${users.length} users by messages; first is ${users[0].username} with ` +
       `${count(users[0].messages)}.`, table);
  }

  function drawErrorKinds(kinds, anyReplies) {
    const table = {
      caption: "Failed replies by kind",
      columns: ["Kind", "Failed replies", "Share"],
      rows: kinds.map((row) => ({key: row.kind, cells: [row.kind, count(row.errors),
                                                        percent(row.share)]})),
    };
    if (!kinds.length) {
      const text = anyReplies ? "No errors in this range" : "No data in this range";
      return draw("chart-error-kinds", null, "", table, text);
    }
    const colors = ["--series-6", "--series-5", "--series-1", "--series-3", "--series-2",
                    "--series-4"].map(css);
    draw("chart-error-kinds", {
      type: "doughnut",
      data: {labels: kinds.map((row) => row.kind), datasets: [{
        label: "Failed replies", data: kinds.map((row) => row.errors),
        backgroundColor: kinds.map((_row, index) => colors[index % colors.length]),
        borderColor: css("--surface"), borderWidth: 2,
      }]},
      options: {
        responsive: true, maintainAspectRatio: false, cutout: "62%",
        animation: matchMedia("(prefers-reduced-motion: reduce)").matches ? false : {duration: 300},
        plugins: {
          legend: {position: "right", labels: LEGEND_LABELS},
          tooltip: {callbacks: {label: (item) =>
            ` ${item.label}: ${count(item.raw)} (${percent(kinds[item.dataIndex].share)})`}},
        },
      },
    }, `Failed replies by kind; the most common is ${kinds[0].kind} with ` +
       `${percent(kinds[0].share)}.`, table);
  }

  function drawTools(tools) {
    const table = {
      caption: "Tool calls by tool",
      columns: ["Tool", "Calls", "Errors", "Timeouts", "Latency p50", "Latency p95"],
      rows: tools.map((row) => ({key: row.tool, cells: [row.tool, count(row.calls),
        count(row.errors), count(row.timeouts), duration(row.latency_p50_ms),
        duration(row.latency_p95_ms)]})),
    };
    if (!tools.length) return draw("chart-tools", null, "", table, "No tool calls in this range");
    const options = baseOptions({horizontal: true, stacked: true});
    options.scales.y.ticks.autoSkip = false;
    draw("chart-tools", {
      type: "bar",
      data: {labels: tools.map((row) => row.tool), datasets: [
        bars("Succeeded", tools.map((row) => row.calls - row.errors), css("--series-1"),
             {maxBarThickness: 14}),
        bars("Failed", tools.map((row) => row.errors), css("--series-6"), {maxBarThickness: 14}),
      ]},
      options,
    }, `Tool calls by tool; the most used is ${tools[0].tool} with ${count(tools[0].calls)} ` +
       `calls, ${count(tools[0].errors)} failed.`, table);
  }

  // Feedback: up and down per agent and model, the regenerate rate per agent,
  // the latest comments (as text: a comment is the user's words).

  function drawFeedback(report, regenerated) {
    const rows = report.feedback.filter((row) => row.rated > 0);
    const table = {
      caption: "Feedback by agent and model",
      columns: ["Agent and model", "Replies", "Rated", "Up", "Down", "Share up"],
      rows: report.feedback.map((row) => ({key: `${row.agent} ${row.model}`, cells: [
        `${row.agent} · ${row.model}`, count(row.replies), count(row.rated), count(row.up),
        count(row.down), percent(row.up_share)]})),
    };
    $("regenerate-rates").textContent = regenerated.length
      ? "Regenerated: " + regenerated.map((row) =>
        `${row.agent} ${percent(row.regenerate_rate)}`).join(" · ") : "";
    const list = $("feedback-comments");
    list.replaceChildren(...report.comments.map((row) => {
      const item = document.createElement("li");
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = `${row.rating > 0 ? "▲ Up" : "▼ Down"} · ${row.username} · ${row.agent}`;
      const text = document.createElement("span");
      text.textContent = row.comment;
      item.append(who, text);
      return item;
    }));
    if (!report.comments.length) {
      const item = document.createElement("li");
      item.textContent = "No comments in this range";
      list.append(item);
    }
    if (!rows.length) return draw("chart-feedback", null, "", table);
    const options = baseOptions({stacked: true, horizontal: true});
    options.scales.y.ticks.autoSkip = false;
    const best = rows.reduce((a, b) => ((b.up_share ?? 0) > (a.up_share ?? 0) ? b : a));
    draw("chart-feedback", {
      type: "bar",
      data: {labels: rows.map((row) => `${row.agent} · ${row.model}`), datasets: [
        bars("Up", rows.map((row) => row.up), css("--series-1"), {maxBarThickness: 18}),
        bars("Down", rows.map((row) => row.down), css("--series-6"), {maxBarThickness: 18}),
      ]},
      options,
    }, `Feedback for ${rows.length} agent and model pairs; the most liked is ` +
       `${best.agent} ${best.model} with ${percent(best.up_share)} up.`, table);
  }

  // Cost (the cost report: rows per day, user, agent and model)

  function money(value) {
    return value.toFixed(value && value < 0.01 ? 4 : 2);
  }

  function drawCost(cost, filters) {
    const perDay = new Map();
    for (const row of cost.by_day) perDay.set(row.day, (perDay.get(row.day) || 0) + row.cost);
    const days = everyDay([...perDay].map(([day, spent]) => ({day, cost: spent})), filters)
      .map((row) => ({day: row.day, cost: row.cost || 0}));
    const total = cost.totals.cost;
    kpi("kpi-cost", total, money(total),
        `${count(cost.totals.unpriced_replies)} unpriced replies`);
    const table = {
      caption: "Cost per day (UTC)",
      columns: ["Day", "Cost"],
      rows: days.map((row) => ({key: row.day, cells: [longDay(row.day), money(row.cost)]})),
    };
    if (!total) return draw("chart-cost", null, "", table);
    draw("chart-cost", {
      type: "bar",
      data: {labels: days.map((row) => shortDay(row.day)), datasets: [
        bars("Cost", days.map((row) => row.cost), css("--series-2")),
      ]},
      options: baseOptions({yFormat: money}),
    }, `Cost per day: ${money(total)} in total.`, table);
  }


  // Key figures

  function kpi(id, value, shown, sub) {
    const element = $(id);
    element.textContent = shown;
    element.dataset.value = missing(value) ? "" : String(value);
    element.title = missing(value) ? "" : String(value);
    $(`${id}-sub`).textContent = sub;
  }

  function drawKpis(s) {
    kpi("kpi-messages", s.messages, compact(s.messages),
        `${count(s.user_messages)} questions · ${count(s.replies)} replies`);
    kpi("kpi-users", s.users, compact(s.users), `${count(s.conversations)} conversations`);
    kpi("kpi-error-rate", s.error_rate, percent(s.error_rate),
        `${count(s.errors)} failed · ${count(s.cancelled)} stopped`);
    kpi("kpi-latency", s.latency_p95_ms, duration(s.latency_p95_ms),
        `p50 ${duration(s.latency_p50_ms)} · first token ${duration(s.ttft_p95_ms)}`);
    kpi("kpi-tokens", s.tokens_in + s.tokens_out, compact(s.tokens_in + s.tokens_out),
        `${compact(s.tokens_in)} in · ${compact(s.tokens_out)} out`);
  }

  // The agent menu lists every agent of the range, whichever is chosen.

  function fillAgents(select, agents, chosen) {
    const models = new Map();
    for (const row of agents) {
      if (!models.has(row.agent)) models.set(row.agent, []);
      models.get(row.agent).push(row.model);
    }
    if (chosen && !models.has(chosen)) models.set(chosen, []);
    const options = [new Option("All agents", "")];
    for (const [agent, names] of [...models].sort(([a], [b]) => a.localeCompare(b))) {
      const label = names.length && !(names.length === 1 && names[0] === agent)
        ? `${agent} (${names.join(", ")})` : agent;
      options.push(new Option(label, agent));
    }
    select.replaceChildren(...options);
    select.value = chosen;
  }

  // Loading

  function setUpDashboard() {
    const ui = {
      report: $("report"), notice: $("notice"), range: $("range-label"),
      since: $("since"), until: $("until"), agent: $("agent"), filters: $("filters"),
      presets: [...document.querySelectorAll(".presets .chip")],
    };
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.color = css("--muted");
    let current = null;  // the AbortController of the load in progress

    function showFilters(filters) {
      const since = sinceDay(filters.since);
      ui.since.value = DATE.test(since) ? since : "";
      ui.until.value = DATE.test(filters.until) ? filters.until : "";
      for (const chip of ui.presets) {
        const pressed = chip.dataset.since === filters.since && !filters.until;
        chip.setAttribute("aria-pressed", String(pressed));
      }
      ui.range.textContent = describeRange(filters);
    }

    async function load() {
      const filters = readFilters();
      showFilters(filters);
      current?.abort();
      const controller = current = new AbortController();
      const signal = controller.signal;
      ui.report.setAttribute("aria-busy", "true");
      const query = apiQuery(filters);
      const unfiltered = apiQuery({...filters, agent: ""});
      try {
        const [summary, daily, agents, everyAgent, users, errors, feedback, conversations, cost,
               tools] = await Promise.all([
          report("summary", query, signal),
          report("daily", query, signal),
          report("agents", query, signal),
          filters.agent ? report("agents", unfiltered, signal) : null,
          report("users", apiQuery(filters, {limit: 10}), signal),
          report("errors", apiQuery(filters, {limit: 1}), signal),
          report("feedback", apiQuery(filters, {limit: 5}), signal),
          report("conversations", apiQuery(filters, {limit: 1}), signal),
          report("cost", query, signal),
          report("tools", query, signal),
        ]);
        ui.notice.hidden = true;
        fillAgents(ui.agent, (everyAgent || agents).agents, filters.agent);
        const s = summary.summary;
        drawKpis(s);
        const days = everyDay(daily.daily, filters);
        drawMessages(days);
        drawLatency(agents.agents);
        drawErrorRate(days);
        drawTokens(days);
        drawUsers(users.users);
        drawErrorKinds(errors.by_kind, s.replies > 0);
        drawTools(tools.tools);
        drawFeedback(feedback, conversations.regenerated);
        drawCost(cost, filters);
      } catch (error) {
        if (error.name === "AbortError") return;
        if (error.status === 401 || error.status === 403) {
          location.reload();  // signed out or no longer an admin: the server says what now
          return;
        }
        ui.notice.textContent = error instanceof ApiError
          ? `The analytics could not be loaded: ${error.message}`
          : "The analytics could not be loaded: the server could not be reached.";
        ui.notice.hidden = false;
      } finally {
        if (current === controller) ui.report.removeAttribute("aria-busy");
      }
    }

    function change(update) {
      writeFilters({...readFilters(), ...update});
      load();
    }

    for (const chip of ui.presets) {
      chip.addEventListener("click", () => change({since: chip.dataset.since, until: ""}));
    }
    ui.since.addEventListener("change", () => change({since: ui.since.value || "all"}));
    ui.until.addEventListener("change", () => change({until: ui.until.value}));
    ui.agent.addEventListener("change", () => change({agent: ui.agent.value}));
    ui.filters.addEventListener("submit", (event) => event.preventDefault());
    window.addEventListener("popstate", load);
    load();
  }

  const view = document.body.dataset.view;
  if (view === "login") setUpLogin();
  if (view === "dashboard") setUpDashboard();
  $("logout")?.addEventListener("click", logout);
})();
