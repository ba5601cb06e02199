"use strict";

// The console routes on the path, reads the JSON API and renders with DOM
// nodes only: API data (ids, references, provider bodies) is always text,
// never parsed as HTML.

const CONSOLE = "/api/console";
const KEY_ITEM = "ticketpay.key";
const POLL_MS = 1500;
// The list counts every listed batch's tickets on each poll, so it polls less often.
const LIST_POLL_MS = 5000;
const TICKETS_PER_PAGE = 50;
const ETA_WINDOW_MS = 15000;
// A ticket's statuses, and its end states, as the handler that served the page names them.
const listed = (name) => document.querySelector(`meta[name="${name}"]`).content.split(" ");
const STATUSES = listed("statuses");
const END_STATES = listed("end-states");

const enc = encodeURIComponent;
const pages = {
  batches: () => CONSOLE,
  batch: (b) => `${CONSOLE}/batches/${enc(b)}`,
  ticket: (b, t) => `${CONSOLE}/batches/${enc(b)}/tickets/${enc(t)}`,
  attention: (b) => `${CONSOLE}/batches/${enc(b)}/attention`,
};
const endpoints = {
  batches: () => "/api/batches?summary=true&limit=50",
  batch: (b) => `/api/batches/${enc(b)}`,
  tickets: (b, status, cursor) =>
    `/api/batches/${enc(b)}/tickets?limit=${TICKETS_PER_PAGE}&status=${enc(status)}&cursor=${enc(cursor || "")}`,
  ticket: (b, t) => `/api/batches/${enc(b)}/tickets/${enc(t)}`,
  capacity: () => "/api/capacity",
  attention: (b) => `/api/batches/${enc(b)}/attention`,
  resolve: (b, t) => `/api/batches/${enc(b)}/tickets/${enc(t)}/resolve`,
  results: (b) => `/api/batches/${enc(b)}/results.csv`,
};

/* ---------- DOM ---------- */

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const show = (...nodes) => $("main").replaceChildren(...nodes);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const label = (name) => String(name).replace(/_/g, " ");
const badge = (status) => h("span", { class: `badge s-${status}` }, label(status));

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function timeOf(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const parts = { hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hour12: false };
  return d.toLocaleTimeString(undefined, parts);
}

function duration(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
      .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function setCrumbs(...crumbs) {
  const items = [h("a", { href: pages.batches() }, "Batches")];
  for (const [text, href] of crumbs) items.push(" › ", href ? h("a", { href }, text) : h("span", {}, text));
  $("crumbs").replaceChildren(...items);
}

function setNotice(text) {
  let notice = $("notice");
  if (!text) return notice && notice.remove();
  if (!notice) $("main").prepend(notice = h("p", { id: "notice", class: "notice" }));
  notice.textContent = text;
}

/* ---------- the key ---------- */

const key = {
  get: () => sessionStorage.getItem(KEY_ITEM),
  set: (k) => sessionStorage.setItem(KEY_ITEM, k),
  forget: () => sessionStorage.removeItem(KEY_ITEM),
};

// A `?code=KEY` link (as Azure Functions gives) is taken once, then kept out of the address bar.
function takeKeyFromAddress() {
  const url = new URL(location.href);
  const code = url.searchParams.get("code");
  if (code === null) return;
  if (code.trim()) key.set(code.trim());
  url.searchParams.delete("code");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
}

function showKeyState() {
  const forget = () => { key.forget(); location.reload(); };
  const ask = () => askForKey("Enter an API key; it is kept in this browser tab only.");
  $("key-state").replaceChildren(key.get()
    ? h("span", {}, "key set ", h("button", { type: "button", class: "link", onclick: forget }, "forget"))
    : h("button", { type: "button", class: "link", onclick: ask }, "enter key"));
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-message").textContent = message;
  $("key-input").focus();
}

function useEnteredKey(event) {
  event.preventDefault();
  const value = $("key-input").value.trim();
  if (!value) return;
  key.set(value);
  $("key-input").value = "";
  $("key-form").hidden = true;
  start();
}

/* ---------- the API ---------- */

class Refused extends Error {}

async function api(path, init = {}) {
  const headers = { accept: "application/json", ...init.headers };
  const k = key.get();
  if (k) headers["x-functions-key"] = k;
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  if (response.ok) return init.text ? response.text() : response.json();
  const detail = await problemDetail(response);
  if (response.status === 401) throw new Refused(detail);
  throw new Error(`${response.status} ${detail}`);
}

async function problemDetail(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || response.statusText;
  } catch {
    return response.statusText;
  }
}

function fail(error) {
  if (error instanceof Refused) {
    const why = key.get() ? "The API refused this key" : "The API needs a key";
    askForKey(`${why} (401: ${error.message}). Enter a valid API key.`);
    show(h("p", { class: "muted" }, "Waiting for a key."));
    return;
  }
  show(h("p", { class: "error", id: "error" }, `Could not load this page: ${error.message}`));
}

/* ---------- pages ---------- */

let generation = 0;

// Repeats `step` every `every` ms until it returns true or the page starts again.
// A failure after the first success only shows a notice: the host may be restarting.
async function poll(mine, step, every = POLL_MS) {
  let first = true;
  while (mine === generation) {
    try {
      if (await step()) return;
      setNotice(null);
    } catch (error) {
      if (first || error instanceof Refused) throw error;
      setNotice(`Lost touch with the API (${error.message}); trying again…`);
    }
    first = false;
    await sleep(every);
  }
}

function route(path) {
  const parts = path.slice(CONSOLE.length).split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0) return (mine) => batchesPage(mine);
  if (parts.length === 2 && parts[0] === "batches") return (mine) => batchPage(mine, parts[1]);
  if (parts.length === 3 && parts[0] === "batches" && parts[2] === "attention") return (mine) => attentionPage(mine, parts[1]);
  if (parts.length === 4 && parts[0] === "batches" && parts[2] === "tickets") {
    return (mine) => ticketPage(mine, parts[1], parts[3]);
  }
  return () => show(h("p", { class: "error" }, "There is no such console page."));
}

function start() {
  const mine = ++generation;
  showKeyState();
  Promise.resolve().then(() => route(location.pathname)(mine)).catch(fail);
}

/* ---------- batches ---------- */

async function batchesPage(mine) {
  document.title = "Batches · ticketpay";
  setCrumbs();
  await poll(mine, async () => {
    const { batches } = await api(endpoints.batches());
    show(h("h1", {}, "Batches"), batches.length ? batchTable(batches) : noBatches());
    return batches.length > 0 && batches.every((b) => b.status === "completed");
  }, LIST_POLL_MS);
}

function noBatches() {
  return h("p", { class: "muted" }, "No batches yet. Upload one with POST /api/batches or ticketpay submit.");
}

function batchTable(batches) {
  const head = ["Batch", "Client", "Created", "Status", "Tickets", "Counts", "Paid / budget"];
  return h("table", { class: "list", id: "batches" },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
    h("tbody", {}, batches.map((b) => h("tr", {},
      h("td", {}, h("a", { href: pages.batch(b.batch_id) }, b.batch_id)),
      h("td", {}, b.client_id),
      h("td", {}, when(b.created_at)),
      h("td", {}, badge(b.status)),
      h("td", { class: "num" }, b.tickets),
      h("td", {}, countChips(b.counts)),
      h("td", { class: "num" }, `${b.paid} / ${b.budget} ${b.currency}`)))));
}

function countChips(counts) {
  return STATUSES.filter((s) => counts[s]).map((s) => h("span", { class: `chip s-${s}` }, `${label(s)} ${counts[s]}`));
}

/* ---------- one batch ---------- */

async function batchPage(mine, batchId) {
  document.title = `Batch ${batchId} · ticketpay`;
  setCrumbs([batchId]);
  const summary = h("section", { id: "batch" });
  const tickets = ticketList(batchId);
  const eta = etaMeter();
  const providers = capacityPanel();
  let shown = false;
  await poll(mine, async () => {
    const status = await api(endpoints.batch(batchId));
    summary.replaceChildren(...batchSummary(status, eta(status)));
    if (!shown) show(summary, providers.root, tickets.root);
    shown = true;
    await Promise.all([tickets.refresh(), providers.refresh()]);
    // The completion time is recorded just after the last ticket is told.
    return status.status === "completed" && Boolean(status.completed_at);
  });
}

function batchSummary(b, eta) {
  const money = (name, amount) => h("div", { class: "money" },
    h("span", { class: "muted" }, name), h("span", {}, h("strong", { id: `money-${name}` }, amount), ` ${b.currency}`));
  return [
    h("h1", {}, "Batch ", h("code", {}, b.batch_id), " ", h("span", { id: "batch-status" }, badge(b.status))),
    facts([
      ["Client", b.client_id],
      ["Created", when(b.created_at)],
      ["Tickets", `${b.tickets} (${b.done} done)`],
      ...(b.queued ? [] : [["Queued", h("span", { id: "not-queued" }, "not yet: stored, its tickets are queued by the sweep")]]),
      [b.status === "completed" ? "Took" : "ETA", h("span", { id: "eta" }, eta)],
      ["For the operator", operatorLinks(b.batch_id)],
    ]),
    h("div", { class: "moneys" },
      money("budget", b.budget), money("reserved", b.reserved), money("paid", b.paid), money("remaining", b.remaining)),
    h("div", { class: "columns" },
      h("div", { id: "stages" }, h("h2", {}, "Stages"),
        b.stages.map((s) => bar(s.stage, s.past, b.tickets, `past · ${s.waiting} waiting`))),
      h("div", { id: "end-states" }, h("h2", {}, "End states"),
        END_STATES.map((s) => bar(s, b.counts[s] || 0, b.tickets, `of ${b.tickets}`, `count-${s}`, `s-${s}`)))),
  ];
}

// The providers' shared capacity, for an operator's key; a client's key is refused it and sees nothing.
function capacityPanel() {
  const root = h("section", { id: "capacity", hidden: "" });
  let refused = false;
  async function refresh() {
    if (refused) return;
    let c;
    try {
      c = await api(endpoints.capacity());
    } catch (error) {
      if (!/^403 /.test(error.message)) throw error;
      refused = true;
      return;
    }
    root.hidden = false;
    root.replaceChildren(h("h2", {}, "Providers"), capacityTable(c));
  }
  return { root, refresh };
}

function capacityTable(c) {
  const head = ["Provider", `In use here (${c.instance || "this process"})`, "Slices held by the deployment", "Paused"];
  const row = (p) => {
    const d = p.deployment;
    const holders = d ? Object.entries(d.holders).map(([who, n]) => `${who} ${n}`).join(", ") : "";
    const allowed = p.in_flight ? ` of ${p.in_flight}` : "";
    return h("tr", { "data-provider": p.provider },
      h("td", {}, p.provider),
      h("td", { class: "num" }, `${p.calls_in_flight}${allowed} in flight, ${p.rate.toFixed(1)} req/s` + (p.waiting ? `, ${p.waiting} waiting` : "")
        + (p.slices && p.needs ? `; needs ${p.needs === p.slices ? "all" : p.needs} of ${p.slices} slices` : "")),
      h("td", { class: "num" }, !p.slices ? "no limits" : d ? `${d.held} of ${p.slices}` : "lease service unreachable",
        d && holders ? h("span", { class: "muted" }, ` (${holders})`) : ""),
      h("td", { class: "paused" }, d && d.paused_until ? `until ${timeOf(d.paused_until)} (429)` : "no"));
  };
  return h("table", { class: "list", id: "capacity-table" },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
    h("tbody", {}, c.providers.map(row)));
}

function bar(name, value, total, note, id, tone) {
  const fill = h("span", { class: `fill ${tone || ""}` });
  fill.style.width = `${total ? (100 * value) / total : 0}%`;
  return h("div", { class: "bar-row", "data-name": name },
    h("span", { class: "bar-label" }, label(name)),
    h("span", { class: "bar" }, fill),
    h("span", { class: "bar-count" }, h("strong", { id }, value), " ", h("span", { class: "muted" }, note)));
}

// The rate over the last ETA_WINDOW_MS of polls, so a slow start or a pause soon stops counting.
function etaMeter() {
  const samples = [];
  return (b) => {
    if (b.status === "completed") {
      const took = (new Date(b.completed_at) - new Date(b.created_at)) / 1000;
      return Number.isFinite(took) ? duration(took) : "completed";
    }
    const now = performance.now();
    samples.push({ at: now, done: b.done });
    while (samples.length > 2 && now - samples[0].at > ETA_WINDOW_MS) samples.shift();
    const rate = (b.done - samples[0].done) / ((now - samples[0].at) / 1000);
    if (!(rate > 0)) return "estimating…";
    return `about ${duration((b.tickets - b.done) / rate)} left (${rate.toFixed(rate < 10 ? 1 : 0)} tickets/s)`;
  };
}

function ticketList(batchId) {
  const state = { status: "", cursor: null, earlier: [], next: null, seq: 0 };
  const go = (change) => {
    change();
    refresh().catch((e) => (e instanceof Refused ? fail(e) : setNotice(`Could not load tickets: ${e.message}`)));
  };
  const filter = h("select", { id: "status-filter", onchange: () => go(() => {
    Object.assign(state, { status: filter.value, cursor: null, earlier: [] });
  }) }, h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s }, label(s))));
  const previous = h("button", { type: "button", id: "tickets-previous", onclick: () => go(() => {
    state.cursor = state.earlier.pop() ?? null;
  }) }, "‹ previous");
  const next = h("button", { type: "button", id: "tickets-next", onclick: () => go(() => {
    state.earlier.push(state.cursor);
    state.cursor = state.next;
  }) }, "next ›");
  const body = h("tbody");
  const head = ["Ticket", "Authority", "Reference", "Status", "Amount due", "Paid", "Updated"];

  async function refresh() {
    const seq = ++state.seq;
    const page = await api(endpoints.tickets(batchId, state.status, state.cursor));
    if (seq !== state.seq) return;
    state.next = page.next_cursor;
    body.replaceChildren(...(page.tickets.length
      ? page.tickets.map((t) => ticketRow(batchId, t))
      : [h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "No tickets here."))]));
    previous.disabled = state.cursor === null;
    next.disabled = !state.next;
  }

  const root = h("section", { id: "ticket-list" },
    h("div", { class: "section-head" }, h("h2", {}, "Tickets"), h("label", {}, "status ", filter)),
    h("table", { class: "list", id: "tickets" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), body),
    h("div", { class: "pager" }, previous, next));
  return { root, refresh };
}

function ticketRow(batchId, t) {
  return h("tr", { "data-ticket": t.ticket_id },
    h("td", {}, h("a", { href: pages.ticket(batchId, t.ticket_id) }, t.ticket_id)),
    h("td", {}, t.authority),
    h("td", { class: "reference" }, t.reference ?? ""),
    h("td", {}, badge(t.status)),
    h("td", { class: "num" }, t.amount_due ?? "—"),
    h("td", { class: "num" }, t.paid),
    h("td", {}, when(t.updated_at)));
}

/* ---------- the operator's day: results, attention, resolve ---------- */

// The last reconciliation of each batch, read once per page (a client key may not: then nothing shows).
const reconciled = new Map();

function operatorLinks(batchId) {
  const last = h("span", { id: "last-run", class: "muted" }, reconciled.get(batchId) || "");
  if (!reconciled.has(batchId)) {
    reconciled.set(batchId, "");
    api(`/api/batches/${enc(batchId)}/reconciliations?limit=1`).then(({ runs }) => {
      const run = runs[0];
      const text = run ? ` · reconciled ${when(run.at)} by ${run.by}: ${run.disagreements} disagreeing` : " · never reconciled";
      reconciled.set(batchId, text);
      if ($("last-run")) $("last-run").textContent = text;
    }).catch(() => {});
  }
  return [
    h("a", { href: pages.attention(batchId), id: "attention-link" }, "needs attention"), " · ",
    h("a", { href: endpoints.results(batchId), id: "results-link", onclick: (e) => downloadResults(e, batchId) }, "results (CSV)"),
    last,
  ];
}

// The key travels in a header, never in a link: fetch the CSV, then hand it over as a file.
async function downloadResults(event, batchId) {
  event.preventDefault();
  try {
    const csv = await api(endpoints.results(batchId), { headers: { accept: "text/csv" }, text: true });
    const link = h("a", { href: URL.createObjectURL(new Blob([csv], { type: "text/csv" })), download: `${batchId}-results.csv` });
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (error) {
    setNotice(`Could not get the results: ${error.message}`);
  }
}

async function attentionPage(mine, batchId) {
  document.title = `Needs attention · ${batchId} · ticketpay`;
  setCrumbs([batchId, pages.batch(batchId)], ["needs attention"]);
  const render = async () => {
    const view = await api(endpoints.attention(batchId));
    const run = view.last_reconciliation;
    show(h("h1", {}, "Needs attention ", h("span", { id: "attention-count", class: "chip" }, view.count)),
      h("p", { id: "last-reconciliation", class: "muted" }, run
        ? `Last reconciliation ${when(run.at)} by ${run.by}: ${run.checked} operations asked, ${run.disagreements} disagreeing.`
        : "Never reconciled: run ticketpay reconcile or GET /api/batches/{id}/reconciliation."),
      view.count ? attentionTable(batchId, view.tickets, render) : h("p", { class: "muted" }, "Nothing needs a person."));
  };
  await poll(mine, async () => { await render(); return true; });
}

function attentionTable(batchId, tickets, render) {
  const head = ["Ticket", "Status", "Concerns", "Reason", "Waiting", "Act"];
  return h("table", { class: "list", id: "attention" },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
    h("tbody", {}, tickets.map((t) => h("tr", { "data-ticket": t.ticket_id },
      h("td", {}, h("a", { href: pages.ticket(batchId, t.ticket_id) }, t.ticket_id)),
      h("td", {}, badge(t.status)),
      h("td", { class: "concerns" }, t.concerns.map((c) => h("span", { class: "chip" }, label(c)))),
      h("td", {}, t.reason ?? ""),
      h("td", { class: "num" }, duration(t.waiting_seconds)),
      h("td", {}, t.actions.length ? resolveForm(batchId, t, render) : h("span", { class: "muted" }, "the sweep is on it"))))));
}

function resolveForm(batchId, t, render) {
  const action = h("select", { name: "action" }, t.actions.map((a) => h("option", { value: a }, label(a))));
  const note = h("input", { name: "note", placeholder: "note (why)", required: true });
  const reference = h("input", { name: "provider_reference", placeholder: "provider reference" });
  const submit = async (event) => {
    event.preventDefault();
    const body = { action: action.value, note: note.value };
    if (reference.value.trim()) body.provider_reference = reference.value.trim();
    try {
      await api(endpoints.resolve(batchId, t.ticket_id), { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      setNotice(null);
      await render();
    } catch (error) {
      setNotice(`${t.ticket_id}: ${error.message}`);
    }
  };
  return h("form", { class: "resolve", onsubmit: submit }, action, note, reference, h("button", { type: "submit" }, "Resolve"));
}

/* ---------- one ticket ---------- */

async function ticketPage(mine, batchId, ticketId) {
  document.title = `Ticket ${ticketId} · ticketpay`;
  setCrumbs([batchId, pages.batch(batchId)], [ticketId]);
  let shown = "";
  await poll(mine, async () => {
    const t = await api(endpoints.ticket(batchId, ticketId));
    const version = `${t.updated_at}|${t.timeline.length}`;
    if (version !== shown) show(...ticketView(t));
    shown = version;
    return t.notified;
  });
}

function ticketView(t) {
  const amount = (v) => (v == null ? null : `${v} ${t.currency}`);
  const pay = t.payment;
  return [
    h("h1", {}, "Ticket ", h("code", {}, t.ticket_id), " ", h("span", { id: "ticket-status" }, badge(t.status))),
    facts([
      ["Batch", h("a", { href: pages.batch(t.batch_id) }, t.batch_id)],
      ["Client", t.client_id],
      ["Authority", t.authority],
      ["Reference", t.reference],
      ["Next stage", t.notified ? null : t.stage],
      ["Amount due", amount(t.amount_due)],
      ["Reserved", amount(t.reserved)],
      ["Paid", amount(t.paid)],
      ["Attempt", t.attempt],
      ["Failures in a row", t.failures || null],
      ["Approved by", t.approved_by.length ? t.approved_by.join(", ") : null],
      ["Payment steps", pay.steps_done || pay.steps_undone ? `${pay.steps_done} done, ${pay.steps_undone} undone` : null],
      ["Payment failure", pay.failure],
      ["In flight", pay.in_flight],
      ["Last error", t.last_error],
      ["Reason", t.reason],
      ["Parked at", t.parked_stage],
      ["Paid in batch", t.duplicate_of && h("a", { href: pages.ticket(t.duplicate_of, t.ticket_id) }, t.duplicate_of)],
      ["Notified", t.notified ? "yes" : "not yet"],
      ["Trace id", t.trace_id && h("code", { id: "trace-id" }, t.trace_id)],
      ["Created", when(t.created_at)],
      ["Updated", when(t.updated_at)],
    ]),
    h("h2", {}, "Timeline"),
    h("ol", { class: "timeline", id: "timeline" }, t.timeline.map(eventItem)),
  ];
}

function eventItem(e) {
  return h("li", { class: `event e-${e.type}` },
    h("div", { class: "event-head" },
      h("time", { datetime: e.at, title: when(e.at) }, timeOf(e.at)), h("span", { class: "chip" }, e.stage), " ", eventText(e)),
    e.type === "exchange" ? exchangeView(e) : null);
}

function eventText(e) {
  switch (e.type) {
    case "accepted": return "accepted";
    case "status_changed": return [badge(e.from), " → ", badge(e.to), e.reason ? ` ${e.reason}` : ""];
    case "retry_scheduled": return `retry ${e.attempt} at ${when(e.retry_at)}: ${e.error}`;
    case "budget_reserved": return `reserved ${e.amount}`;
    case "budget_released": return `released ${e.amount}`;
    case "paid": return `paid ${e.amount}`;
    case "notified": return `client notified: ${e.outcome}`;
    case "redriven": return `redriven to ${e.to_stage} (parked because ${e.parked_because})`;
    case "resolved": return `${label(e.action)} by ${e.by}: ${e.note}${e.provider_reference ? ` (${e.provider_reference})` : ""}`;
    case "exchange": return [h("strong", {}, `${e.provider} ${e.operation}`), ` attempt ${e.attempt} `, badge(e.outcome)];
    default: return label(e.type);
  }
}

function exchangeView(e) {
  const response = e.response;
  return h("div", { class: "exchange" },
    e.idempotency_key ? h("p", { class: "muted" }, "idempotency key ", h("code", {}, e.idempotency_key)) : null,
    h("div", { class: "http" },
      h("div", { class: "request" },
        h("h4", {}, "Request"),
        h("p", {}, h("code", {}, `${e.request.method} ${e.request.url}`)),
        headersBlock(e.request.headers), bodyBlock(e.request.body)),
      h("div", { class: "response" },
        h("h4", {}, "Response"),
        response ? h("p", {}, h("code", {}, `${response.status}`), ` after ${e.latency_ms} ms`)
          : h("p", { class: "error" }, `no response after ${e.latency_ms} ms`),
        e.error ? h("p", { class: "error" }, e.error) : null,
        response ? [headersBlock(response.headers), bodyBlock(response.body)] : null)));
}

function headersBlock(headers) {
  const lines = Object.entries(headers || {}).map(([k, v]) => `${k}: ${v}`);
  return lines.length ? h("pre", { class: "headers" }, lines.join("\n")) : null;
}

function bodyBlock(body) {
  if (body === undefined || body === null) return h("p", { class: "muted" }, "no body");
  return h("pre", { class: "body" }, typeof body === "string" ? body : JSON.stringify(body, null, 2));
}

/* ---------- start ---------- */

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useEnteredKey);
  takeKeyFromAddress();
  start();
});
