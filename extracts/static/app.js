// The Extracts page: plain JavaScript, no build step, nothing from another host.
// Every action goes through the same /api routes a script uses, with the bearer token
// pasted once and kept in sessionStorage (this tab only). Views are picked by the URL's
// hash: #/ (extracts and schemas), #/new, #/extracts/<id>[/runs/<run>], #/extracts/<id>/edit.
"use strict";

const TOKEN_KEY = "extracts.token";
const ACTIVE = new Set(["pending", "queued", "running"]);
const POLL_ACTIVE_MS = 500; // a running run's progress: twice a second
const POLL_IDLE_MS = 5000;
const RETRY_MS = 2000; // the service out of reach or busy: tried again this often
const PHASES = {
  queued: "Queued",
  exporting_describe: "Writing describe.yaml",
  exported_describe: "describe.yaml written",
  exporting_data: "Exporting data",
  writing_manifest: "Writing the manifest",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};
const DEFAULTS = {
  name: "", description: null, format: "jsonl", include: ["describe", "data"], schemas: null,
  filter: null, compress: true, split_files: false, split_max_records: 1000000, schedule: null,
  schedule_enabled: false, retention_days: 7, enabled: true, max_attempts: 3, retry_delay_seconds: 60,
};
const FIELDS = Object.keys(DEFAULTS);

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (selector) => document.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const number = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
const plural = (n, word) => `${number(n)} ${word}${n === 1 ? "" : "s"}`;
const pad = (n) => String(n).padStart(2, "0");

// Local time, compact and sortable: 2026-11-30 19:10:18.
function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

const badge = (status) => h("span", { class: `badge ${status || "none"}` }, status || "never run");

// JSON with exact integers: a filter value past 2^53 (a 64-bit id) parsed as a Number is rounded,
// then shown and saved back rounded. JSON.rawJSON keeps its digits, and JSON.stringify writes them
// back as they came (browsers without it round, as before).
function parseJson(text) {
  return JSON.parse(text, (key, value, context) => (typeof value === "number" && !Number.isSafeInteger(value)
    && JSON.rawJSON && context && /^-?\d+$/.test(context.source) ? JSON.rawJSON(context.source) : value));
}

function query(params) {
  return new URLSearchParams(params).toString();
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.error_code || "";
    this.details = body.details || [];
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

async function send(method, path, body, { checkToken = null } = {}) {
  const headers = { Authorization: `Bearer ${checkToken ?? token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`api/${path}`, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(0, { error: `Cannot reach the service (${exc.message}); is it running?` });
  }
  return response;
}

async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON: the status says enough */ }
  if (response.status === 401 && token()) {
    signOut("The service refused the token (401 Unauthorized): it may have changed since it was "
      + "pasted. Paste the current token.");
  }
  return new ApiError(response.status, body);
}

async function api(method, path, body) {
  const response = await send(method, path, body);
  if (!response.ok) throw await failure(response);
  return parseJson(await response.text()).data;
}

function filename(disposition) {
  const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition || "");
  if (star) return decodeURIComponent(star[1]);
  const plain = /filename="([^"]+)"/i.exec(disposition || "");
  return plain ? plain[1] : null;
}

// A plain link cannot send the Authorization header: fetch the file, then save the blob.
async function download(path, fallback, button) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "Downloading…";
  try {
    const response = await send("GET", path);
    if (!response.ok) throw await failure(response);
    const blob = await response.blob();
    const link = h("a", { href: URL.createObjectURL(blob), download: filename(response.headers.get("Content-Disposition")) || fallback });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  } catch (exc) {
    showBanner(`Download failed: ${exc.message}`);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// ---------------------------------------------------------------- page frame

let view = { alive: false };
let notice = null; // shown by the next view: what the last action did

function showBanner(message, kind = "error") {
  const banner = $("#banner");
  banner.replaceChildren(
    h("span", {}, message),
    h("button", { type: "button", class: "ghost", "aria-label": "Dismiss", onclick: hideBanner }, "×"),
  );
  banner.className = `banner ${kind}`;
  banner.hidden = false;
}

function hideBanner() {
  $("#banner").hidden = true;
}

function go(hash, message = null, kind = "info") {
  notice = message && { message, kind };
  if (location.hash === hash) render();
  else location.hash = hash;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  render(message);
}

// A segment of the URL's hash, decoded; one that is not valid percent-encoding (a mangled link)
// stays as it is: decodeURIComponent would throw and leave a blank page.
function segment(text) {
  try { return decodeURIComponent(text); } catch { return text; }
}

function render(message) {
  view.alive = false; // stops the previous view's polling
  view = { alive: true };
  const signedIn = Boolean(token());
  $("#signout").hidden = !signedIn;
  $("#main").replaceChildren();
  if (!signedIn) return tokenView(message);
  if (typeof message === "string") showBanner(message);
  else if (notice) showBanner(notice.message, notice.kind);
  else hideBanner();
  notice = null;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(segment);
  if (parts[0] === "new") return formView(view, null);
  if (parts[0] === "extracts" && parts[1]) {
    if (parts[2] === "edit") return formView(view, parts[1]);
    return extractView(view, parts[1], parts[2] === "runs" ? parts[3] : null);
  }
  return homeView(view);
}

function failed(exc) {
  if (exc.status === 401) return; // already back at the token form
  showBanner(exc.message);
}

// The service out of reach (stopped, restarting) or busy for a moment (503): a polling view says so
// and tries again, rather than stopping until the page is reloaded.
const passing = (exc) => exc.status === 0 || exc.status === 503;

// ---------------------------------------------------------------- the token

function tokenView(message) {
  hideBanner();
  const input = h("input", { id: "token", type: "password", autocomplete: "off", spellcheck: "false", required: true });
  const error = h("p", { id: "token-error", class: "field-error", role: "alert" }, typeof message === "string" ? message : "");
  const submit = async (event) => {
    event.preventDefault();
    const value = input.value.trim();
    error.textContent = "";
    if (!value) { error.textContent = "Paste the token first."; return; }
    if (/[^\x20-\x7e]/.test(value)) { // fetch cannot send it: it would say the service is out of reach
      error.textContent = "A token is printable ASCII; this one holds other characters (typographic quotes? "
        + "a pasted line break?). Paste it as extracts-app printed it.";
      return;
    }
    try {
      // A call on the state only: with the source down (503) the extracts and their files still serve.
      const response = await send("GET", `data/extracts?${query({ "filter[limit]": 1 })}`, undefined, { checkToken: value });
      if (response.status === 401) {
        error.textContent = "The service refused this token (401 Unauthorized). Check it and paste it "
          + "again: extracts-app prints it at start-up and keeps it in <state file>.token.";
        return;
      }
      if (!response.ok) throw await failure(response);
    } catch (exc) {
      error.textContent = exc.message;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    go(location.hash && location.hash !== "#" ? location.hash : "#/");
  };
  $("#main").append(h("section", { class: "card narrow" },
    h("h1", {}, "Connect to the service"),
    h("p", {}, "Paste the bearer token. extracts-app prints it at start-up (and keeps it in ",
      h("code", {}, "<state file>.token"), "). This tab keeps it until you close it."),
    h("form", { onsubmit: submit, novalidate: true },
      h("label", { for: "token" }, "Token"),
      h("div", { class: "row" }, input, h("button", { type: "submit" }, "Connect")),
      error)));
  input.focus();
}

// ---------------------------------------------------------------- extracts and schemas

function schemaTable(schemas) {
  if (!schemas.length) return h("p", { class: "muted" }, "The source has no tables.");
  return h("table", { class: "schemas" },
    h("thead", {}, h("tr", {}, h("th", {}, "Schema"), h("th", { class: "num" }, "Rows"), h("th", { class: "num" }, "Columns"))),
    h("tbody", {}, schemas.map((s) => h("tr", {},
      h("td", {}, s.name, s.type === "view" ? [" ", h("span", { class: "tag" }, "view")] : null),
      h("td", { class: "num" }, number(s.row_count)),
      h("td", { class: "num" }, number(s.columns))))));
}

function extractItem(e) {
  const runs = e.total_runs
    ? `${plural(e.total_runs, "run")} · ${number(e.successful_runs)} completed · ${number(e.failed_runs)} failed`
    : "no runs yet";
  return h("li", {},
    h("a", { class: "item", href: `#/extracts/${encodeURIComponent(e.id)}` },
      h("span", { class: "item-main" },
        h("strong", {}, e.name),
        e.enabled ? null : [" ", h("span", { class: "tag" }, "disabled")],
        e.description ? h("span", { class: "muted block" }, e.description) : null),
      h("span", { class: "item-meta" },
        h("span", { class: "line" }, h("span", { class: "muted" }, `${e.format}${e.schedule_enabled ? ` · ${e.schedule} UTC` : ""}`),
          badge(e.last_run_status)),
        h("span", { class: "muted" }, runs))));
}

async function homeView(v) {
  const list = h("ul", { class: "items", id: "extracts" }, h("li", { class: "muted" }, "Loading…"));
  const schemas = h("div", { id: "schemas" }, h("p", { class: "muted" }, "Loading…"));
  $("#main").append(h("div", { class: "layout" },
    h("section", { class: "card" },
      h("div", { class: "head" }, h("h1", {}, "Extracts"),
        h("button", { type: "button", onclick: () => go("#/new") }, "New extract")),
      list),
    h("aside", { class: "card" }, h("h2", {}, "Source schemas"), schemas)));
  let described = null; // the describe call; made again after a passing failure
  let shown = "";
  let lost = false;
  let schemasLost = false;
  while (v.alive) {
    described ??= api("GET", "describe").then((s) => {
      if (schemasLost) hideBanner();
      schemas.replaceChildren(schemaTable(s));
    }, (exc) => {
      if (passing(exc)) [described, schemasLost] = [null, true];
      failed(exc);
    });
    try {
      const extracts = await api("GET", `data/extracts?${query({ "filter[limit]": 1000 })}`);
      if (lost) hideBanner();
      lost = false;
      const key = JSON.stringify(extracts);
      if (key !== shown && v.alive) {
        shown = key;
        list.replaceChildren(...(extracts.length ? extracts.map(extractItem)
          : [h("li", { class: "muted empty" }, "No extracts yet: create one with New extract.")]));
      }
    } catch (exc) {
      failed(exc);
      if (!passing(exc)) return;
      lost = true;
    }
    await sleep(lost ? RETRY_MS : POLL_IDLE_MS);
  }
}

// ---------------------------------------------------------------- one extract, its runs

function factGrid(facts, cls = "facts") {
  return h("div", { class: cls }, Object.entries(facts).map(([k, value]) => h("div", { class: "fact" },
    h("span", { class: "muted block small" }, k), h("span", { class: "block", "data-fact": k.toLowerCase() }, value))));
}

function configList(e) {
  return factGrid({
    Format: e.format, Include: e.include.join(", "), Schemas: e.schemas ? e.schemas.join(", ") : "every table",
    Filter: e.filter ? JSON.stringify(e.filter) : "none", Compress: e.compress ? "gzip" : "no",
    "Split files": e.split_files ? `${number(e.split_max_records)} records a part` : "no",
    Schedule: e.schedule ? `${e.schedule} (UTC)${e.schedule_enabled ? "" : ", paused"}` : "none",
    "Next run": when(e.next_run_at), Retention: plural(e.retention_days, "day"),
    Retries: e.max_attempts > 1 ? `${e.max_attempts} attempts, first after ${e.retry_delay_seconds} s` : "never",
    Enabled: e.enabled ? "yes" : "no",
    Runs: `${number(e.total_runs)} (${number(e.successful_runs)} completed, ${number(e.failed_runs)} failed, ${number(e.cancelled_runs)} cancelled)`,
  }, "facts config");
}

function progressBlock(run) {
  const d = run.progress_detail || {};
  const records = d.records_total ? `${number(d.records_exported)} of ${number(d.records_total)}` : number(d.records_exported ?? run.records_exported);
  const facts = {
    Phase: PHASES[d.phase] || d.phase || "—",
    Schema: d.current_schema || "—",
    Records: records,
    Schemas: d.schemas_total !== undefined ? `${number(d.schemas_completed)} of ${number(d.schemas_total)}` : "—",
    Started: when(run.started_at),
    Duration: run.status === "running" && run.started_at
      ? `${seconds((Date.now() - Date.parse(run.started_at)) / 1000)} so far` : seconds(run.duration_seconds),
  };
  if (run.status === "completed") Object.assign(facts, { Files: number(run.artifacts_created), Size: bytes(run.total_size_bytes) });
  return [
    h("div", { class: "progress-row" },
      h("progress", { id: "run-progress", max: 100, value: run.progress, "aria-label": "Progress" }),
      h("span", { id: "run-percent", class: "percent" }, `${run.progress}%`)),
    factGrid(facts),
    run.not_before && run.status === "queued"
      ? h("p", { class: "muted" }, `Attempt ${run.attempt}: waits until ${when(run.not_before)} (Run starts it now).`) : null,
  ];
}

function errorBlock(run) {
  if (run.status !== "failed" || !run.error) return null;
  const detail = run.error_detail || {};
  return h("div", { class: "run-error", role: "alert" },
    h("strong", {}, "Error: "), h("span", { id: "run-error" }, run.error),
    detail.retryable !== undefined ? h("p", { class: "muted" }, detail.retryable
      ? (run.retry_run_id ? "A transient cause: retried as " : "A transient cause, no attempts left.")
      : "A permanent cause: not retried.", run.retry_run_id
      ? h("a", { href: `#/extracts/${encodeURIComponent(run.extract_id)}/runs/${encodeURIComponent(run.retry_run_id)}` }, run.retry_run_id) : null) : null,
    detail.traceback ? h("details", {}, h("summary", {}, `Details (${detail.type || "traceback"})`), h("pre", {}, detail.traceback)) : null);
}

function filesBlock(run, artifacts) {
  if (ACTIVE.has(run.status)) return null;
  const live = artifacts.filter((a) => !a.deleted_at);
  const zip = run.status === "completed" && live.length === artifacts.length && live.length // else 410
    ? h("button", { type: "button", id: "download-zip", onclick: (event) => download(`extracts/runs/${encodeURIComponent(run.id)}/download`, `${run.id}.zip`, event.currentTarget) }, "Download ZIP")
    : null;
  return h("div", { class: "files" },
    h("div", { class: "head" }, h("h3", {}, run.status === "completed" ? "Files" : "Files written before the run ended"), zip),
    live.length ? h("ul", { class: "items files-list" }, live.map((a) => h("li", { class: "file" },
      h("span", { class: "item-main" }, h("strong", {}, a.artifact_name),
        h("span", { class: "muted block" }, [a.artifact_type, bytes(a.size_bytes), a.records !== null ? `${number(a.records)} records` : null].filter(Boolean).join(" · ")),
        h("code", { class: "muted block checksum", title: "SHA-256" }, a.checksum)),
      h("button", { type: "button", class: "secondary", "aria-label": `Download ${a.artifact_name}`, onclick: (event) => download(`extracts/artifacts/${encodeURIComponent(a.id)}/download`, a.artifact_name, event.currentTarget) }, "Download"))))
      : h("p", { class: "muted" }, artifacts.length ? "The files were deleted (retention or DELETE)." : "No files."));
}

function runItem(run, selected) {
  return h("li", {}, h("a", { class: `item${selected ? " selected" : ""}`, href: `#/extracts/${encodeURIComponent(run.extract_id)}/runs/${encodeURIComponent(run.id)}` },
    h("span", { class: "item-main" }, h("code", {}, run.id), h("span", { class: "muted block" }, `${when(run.created_at)} · ${run.triggered_by}${run.attempt > 1 ? ` · attempt ${run.attempt}` : ""}`)),
    h("span", { class: "item-meta" }, badge(run.status), h("span", { class: "muted" }, seconds(run.duration_seconds)))));
}

function patch(el, key, build) {
  if (el.dataset.key === key) return;
  el.dataset.key = key;
  el.replaceChildren(...[build()].flat(Infinity).filter(Boolean));
}

async function extractView(v, id, runId) {
  const title = h("h1", {}, "…");
  const about = h("div", {});
  const facts = h("div", {});
  const runBox = h("section", { class: "card", id: "run" }, h("p", { class: "muted" }, "Loading…"));
  const runList = h("ul", { class: "items", id: "runs" });
  const runButton = h("button", { type: "button", id: "run-button" }, "Run");
  const cancelButton = h("button", { type: "button", class: "secondary", id: "cancel-button", hidden: true }, "Cancel run");
  const deleteButton = h("button", { type: "button", class: "danger" }, "Delete");
  const path = `data/extracts/${encodeURIComponent(id)}`;
  let armed = null;
  const act = async (button, work) => {
    button.disabled = true;
    hideBanner();
    try { await work(); } catch (exc) { failed(exc); } finally { button.disabled = false; }
  };
  runButton.addEventListener("click", () => act(runButton, async () => {
    const started = await api("POST", `extracts/${encodeURIComponent(id)}/run`);
    go(`#/extracts/${encodeURIComponent(id)}/runs/${encodeURIComponent(started.run_id)}`);
  }));
  cancelButton.addEventListener("click", () => act(cancelButton, async () => {
    const cancelled = await api("POST", `extracts/${encodeURIComponent(id)}/cancel`);
    showBanner(`Run ${cancelled.run_id} cancelled.`, "info");
  }));
  deleteButton.addEventListener("click", () => act(deleteButton, async () => {
    if (!armed) { // a second click within five seconds deletes: no native dialog
      deleteButton.textContent = "Click again to delete";
      armed = setTimeout(() => { armed = null; deleteButton.textContent = "Delete"; }, 5000);
      return;
    }
    clearTimeout(armed);
    const gone = await api("DELETE", path);
    go("#/", `Extract “${gone.name}” deleted; its runs and files stay downloadable through the API.`);
  }));
  $("#main").append(
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← Extracts")),
    h("section", { class: "card" },
      h("div", { class: "head" }, title, h("div", { class: "actions" }, runButton, cancelButton,
        h("button", { type: "button", class: "secondary", onclick: () => go(`#/extracts/${encodeURIComponent(id)}/edit`) }, "Edit"), deleteButton)),
      about),
    runBox,
    h("section", { class: "card" }, h("h2", {}, "Configuration"), facts),
    h("section", { class: "card" }, h("h2", {}, "Runs"), runList));
  let artifacts = [];
  let lost = false;
  let agreed = true;
  while (v.alive) {
    let run = null;
    try {
      const [extract, runs] = await Promise.all([api("GET", path),
        api("GET", `data/extract_runs?${query({ "filter[where][extract_id]": id, "filter[limit]": 20 })}`)]);
      // Two reads, not one snapshot: a run that started or ended between them shows in one and
      // not in the other (its run ended, the counts not yet). Then read again soon, not in 5 s.
      const latest = runs[0] || { id: null, status: null };
      agreed = extract.last_run_id === latest.id && extract.last_run_status === latest.status;
      const chosen = runId || (runs[0] && runs[0].id);
      run = runs.find((r) => r.id === chosen) || (chosen ? await api("GET", `data/extract_runs/${encodeURIComponent(chosen)}`) : null);
      // At every poll once the run ended: its files change with nothing on the run to show it
      // (deleted with the run or by the retention sweep; a cancelled run's worker records its last).
      if (run && !ACTIVE.has(run.status)) {
        artifacts = await api("GET", `data/extract_artifacts?${query({ "filter[where][run_id]": run.id, "filter[order]": "created_at asc", "filter[limit]": 1000 })}`);
      }
      if (!v.alive) return;
      if (lost) hideBanner();
      lost = false;
      document.title = `${extract.name} · Extracts`;
      title.textContent = extract.name;
      patch(about, JSON.stringify([extract.description, extract.enabled]), () => [
        h("p", { class: extract.description ? "" : "muted" }, extract.description || "No description."),
        extract.enabled ? null : h("p", { class: "muted" }, "Disabled: enable it (Edit) to run it.")]);
      patch(facts, JSON.stringify(extract), () => configList(extract));
      const active = runs.some((r) => ACTIVE.has(r.status));
      runButton.hidden = active;
      cancelButton.hidden = !active;
      patch(runList, JSON.stringify([runs.map((r) => [r.id, r.status, r.duration_seconds]), run && run.id]), () => runs.length
        ? runs.map((r) => runItem(r, run && r.id === run.id)) : h("li", { class: "muted empty" }, "Not run yet."));
      patch(runBox, JSON.stringify([run, artifacts]), () => run
        ? [h("div", { class: "head" }, h("h2", {}, "Run ", h("code", {}, run.id)), badge(run.status)),
          progressBlock(run), errorBlock(run), filesBlock(run, artifacts)]
        : h("p", { class: "muted" }, "No run yet: Run starts one."));
    } catch (exc) {
      if (exc.status === 404 && !run) {
        go("#/", exc.message, "error");
        return;
      }
      failed(exc);
      if (!passing(exc)) return;
      lost = true;
    }
    await sleep(lost ? RETRY_MS : (run && ACTIVE.has(run.status)) || !agreed ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }
}

// ---------------------------------------------------------------- create and edit

function control(name, label, input, hint) {
  return h("div", { class: "field", "data-field": name },
    input.type === "checkbox" ? h("label", { class: "check" }, input, " ", label) : [h("label", { for: `f-${name}` }, label), input],
    hint ? h("p", { class: "hint" }, hint) : null,
    h("p", { class: "field-error", id: `err-${name}`, role: "alert" }));
}

function formControls(e, schemas) {
  const text = (name, value, attrs = {}) => h("input", { id: `f-${name}`, name, type: "text", value: value ?? "", ...attrs });
  const integer = (name, value, min, max) => h("input", { id: `f-${name}`, name, type: "number", step: 1, min, max, value: value ?? "", inputmode: "numeric" });
  const check = (name, value) => h("input", { id: `f-${name}`, name, type: "checkbox", checked: Boolean(value) });
  const known = new Set(schemas.map((s) => s.name));
  const listed = [...schemas, ...(e.schemas || []).filter((n) => !known.has(n)).map((name) => ({ name, type: "missing", row_count: null }))];
  const every = h("input", { type: "radio", name: "schemas-mode", value: "all", checked: e.schemas === null, id: "f-schemas-all" });
  const chosen = h("input", { type: "radio", name: "schemas-mode", value: "some", checked: e.schemas !== null, id: "f-schemas-some" });
  const boxes = h("div", { class: "schema-boxes" }, listed.map((s) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "schema", value: s.name, checked: (e.schemas || []).includes(s.name) }),
    " ", s.name, h("span", { class: "muted" }, s.type === "missing" ? " (not in the source)" : ` ${s.type === "view" ? "view, " : ""}${number(s.row_count)} rows`))));
  boxes.addEventListener("change", () => { chosen.checked = true; });
  return h("div", { class: "form-grid" },
    h("fieldset", {}, h("legend", {}, "Extract"),
      control("name", "Name", text("name", e.name, { required: true, maxlength: 200 })),
      control("description", "Description", h("textarea", { id: "f-description", name: "description", rows: 2 }, e.description ?? "")),
      control("enabled", "Enabled (a disabled extract cannot be run)", check("enabled", e.enabled))),
    h("fieldset", {}, h("legend", {}, "What to export"),
      control("format", "Format", h("select", { id: "f-format", name: "format" },
        ["jsonl", "json", "yaml", "archive"].map((f) => h("option", { value: f, selected: e.format === f }, f)))),
      h("div", { class: "field", "data-field": "include" }, h("span", { class: "label" }, "Include"),
        h("div", { class: "row" }, ["describe", "data"].map((part) => h("label", { class: "check" },
          h("input", { type: "checkbox", name: "include", value: part, checked: e.include.includes(part) }), " ", part))),
        h("p", { class: "field-error", id: "err-include", role: "alert" })),
      h("div", { class: "field", "data-field": "schemas" }, h("span", { class: "label" }, "Schemas"),
        h("label", { class: "check" }, every, " Every table (views only when chosen)"),
        h("label", { class: "check" }, chosen, " These:"), boxes,
        h("p", { class: "field-error", id: "err-schemas", role: "alert" })),
      control("filter", "Filter (JSON, empty for none)", h("textarea", { id: "f-filter", name: "filter", rows: 3, spellcheck: "false", placeholder: '{"orders": {"where": {"total": {"$gte": 100}}}}' }, e.filter ? JSON.stringify(e.filter, null, 1) : ""),
        "Per schema: column → value or one of $eq $ne $gt $gte $lt $lte $in $nin $like $null.")),
    h("fieldset", {}, h("legend", {}, "Files"),
      control("compress", "Compress data files (gzip)", check("compress", e.compress)),
      control("split_files", "Split each schema into parts", check("split_files", e.split_files)),
      control("split_max_records", "Records per part", integer("split_max_records", e.split_max_records, 1, 100000000))),
    h("fieldset", {}, h("legend", {}, "Schedule, retention, retries"),
      control("schedule", "Schedule (cron, UTC)", text("schedule", e.schedule, { placeholder: "0 3 * * *", spellcheck: "false" })),
      control("schedule_enabled", "Run on the schedule", check("schedule_enabled", e.schedule_enabled)),
      control("retention_days", "Keep files for (days)", integer("retention_days", e.retention_days, 1, 365)),
      control("max_attempts", "Attempts (1 = never retry)", integer("max_attempts", e.max_attempts, 1, 10)),
      control("retry_delay_seconds", "First retry after (seconds)", integer("retry_delay_seconds", e.retry_delay_seconds, 1, 86400))));
}

// A list of the same items is no change: the check boxes read include and schemas in the page's
// order, not the extract's (the API keeps the order it was given).
function unchanged(value, loaded) {
  if (Array.isArray(value) && Array.isArray(loaded)) return value.length === loaded.length && value.every((item) => loaded.includes(item));
  return JSON.stringify(value) === JSON.stringify(loaded);
}

// The body exactly as typed: the API validates, and its messages land beside each field.
function readForm(form) {
  const value = (name) => form.elements[name].value;
  const integer = (name) => { const v = value(name).trim(); return v === "" ? null : /^-?\d+$/.test(v) ? Number(v) : v; };
  const errors = {};
  let filter = null;
  if (value("filter").trim()) {
    try { filter = parseJson(value("filter")); } catch (exc) { errors.filter = `filter is not valid JSON: ${exc.message}`; }
  }
  const body = {
    name: value("name"), description: value("description") || null, format: value("format"),
    include: [...form.querySelectorAll("input[name=include]:checked")].map((i) => i.value),
    schemas: form.elements["schemas-mode"].value === "all" ? null : [...form.querySelectorAll("input[name=schema]:checked")].map((i) => i.value),
    filter, compress: form.elements.compress.checked, split_files: form.elements.split_files.checked,
    split_max_records: integer("split_max_records"), schedule: value("schedule").trim() || null,
    schedule_enabled: form.elements.schedule_enabled.checked, retention_days: integer("retention_days"),
    enabled: form.elements.enabled.checked, max_attempts: integer("max_attempts"), retry_delay_seconds: integer("retry_delay_seconds"),
  };
  return { body, errors };
}

function showErrors(form, summary, message, byField) {
  form.querySelectorAll(".field-error").forEach((p) => { p.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  const elsewhere = [];
  for (const [field, text] of byField) {
    const base = field.split(/[.[]/)[0]; // "filter.orders.where.total" → filter
    const slot = form.querySelector(`#err-${CSS.escape(base)}`);
    if (!slot) { elsewhere.push(text); continue; }
    slot.textContent = slot.textContent ? `${slot.textContent} ${text}` : text;
    slot.closest(".field").classList.add("invalid");
  }
  summary.replaceChildren(message ? h("strong", {}, message) : "", elsewhere.length ? h("ul", {}, elsewhere.map((t) => h("li", {}, t))) : "");
  summary.hidden = !message && !elsewhere.length;
  const first = form.querySelector(".invalid input, .invalid textarea, .invalid select");
  if (first) first.focus();
}

async function formView(v, id) {
  const path = id ? `data/extracts/${encodeURIComponent(id)}` : "data/extracts";
  $("#main").append(h("p", { class: "muted" }, "Loading…"));
  let extract;
  let schemas;
  try {
    [extract, schemas] = await Promise.all([id ? api("GET", path) : DEFAULTS, api("GET", "describe")]);
  } catch (exc) {
    failed(exc);
    return;
  }
  if (!v.alive) return;
  document.title = `${id ? `Edit ${extract.name}` : "New extract"} · Extracts`;
  const summary = h("div", { class: "form-summary", role: "alert", id: "form-summary", hidden: true });
  const save = h("button", { type: "submit" }, id ? "Save" : "Create");
  const form = h("form", { novalidate: true, id: "extract-form" }, summary, formControls(extract, schemas),
    h("div", { class: "actions" }, save,
      h("a", { class: "button secondary", href: id ? `#/extracts/${encodeURIComponent(id)}` : "#/" }, "Cancel")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { body, errors } = readForm(form);
    if (Object.keys(errors).length) { showErrors(form, summary, "Fix the fields marked below.", Object.entries(errors)); return; }
    // An edit sends only the fields changed in the form: the others, as loaded, may have been
    // changed meanwhile through the API, and sending them back would undo that (PUT is partial).
    const sent = id ? Object.fromEntries(Object.entries(body).filter(([key, value]) => !unchanged(value, extract[key]))) : body;
    save.disabled = true;
    try {
      const saved = await api(id ? "PUT" : "POST", path, sent);
      go(`#/extracts/${encodeURIComponent(saved.id)}`);
    } catch (exc) {
      if (exc.status !== 401) showErrors(form, summary, exc.message, (exc.details || []).map((d) => [d.field, d.message]));
    } finally {
      save.disabled = false;
    }
  });
  $("#main").replaceChildren(
    h("p", { class: "crumbs" }, h("a", { href: id ? `#/extracts/${encodeURIComponent(id)}` : "#/" }, id ? `← ${extract.name}` : "← Extracts")),
    h("section", { class: "card" }, h("h1", {}, id ? `Edit “${extract.name}”` : "New extract"), form));
  form.elements.name.focus();
}

// ---------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", () => render());
  render();
});
