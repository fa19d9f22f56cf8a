// retort view: a read-only browser over the store's JSON API (retort/view.py).
// No framework and no build step. Every value from the store is inserted as text (textContent),
// never as HTML: completions are untrusted.
"use strict";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const LINEAGE = ["_id", "_parent", "_sample", "_call", "_raw", "_error"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function text(value) {
  if (value === null || value === undefined) return "NULL";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function link(href, label) { return el("a", { href }, label); }
function enc(part) { return encodeURIComponent(part); }

class ApiError extends Error {}

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    for (const v of Array.isArray(value) ? value : [value]) if (v !== undefined && v !== null && v !== "") query.append(key, v);
  }
  const response = await fetch(`/api/${path}?${query}`);
  const body = await response.json();
  if (!response.ok) throw new ApiError(body.error || `HTTP ${response.status}`);
  return body;
}

function showError(error) {
  banner.textContent = error instanceof ApiError ? error.message : `viewer error: ${error}`;
  banner.hidden = false;
}

function failed(error) { showError(error); document.body.dataset.state = "ready"; }

function clearError() { banner.hidden = true; banner.textContent = ""; }

function status(value) { return el("span", { class: `status ${value}` }, value); }

function table(head, rows, opts) {
  const numeric = new Set((opts && opts.numeric) || []);
  const wrap = new Set((opts && opts.wrap) || []);
  return el("div", { class: "wrap" }, el("table", { id: opts && opts.id },
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", { class: numeric.has(i) ? "num" : null }, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) =>
      el("td", { class: numeric.has(i) ? "num" : wrap.has(i) ? "text" : null }, c)))))));
}

// --------------------------------------------------------------------------- pages

async function pageRuns() {
  const data = await api("runs");
  const rows = data.runs.map((r) => [
    r.kept ? link(`#/run/${r.run}`, `run ${r.run}`) : `run ${r.run}`, r.pipeline, status(r.status),
    text(r.started).slice(0, 19), r.seconds ?? "", r.calls_made ?? "", r.cache_hits ?? "",
    r.failures ? link(`#/failures/${r.run}`, r.failures) : "0", r.kept ? r.stages.join(", ") : "tables pruned"]);
  return [el("h2", {}, `runs (${data.runs.length})`),
    data.runs.length ? table(["run", "pipeline", "status", "started", "seconds", "calls made", "cache hits",
      "failures", "stages"], rows, { id: "runs", numeric: [4, 5, 6, 7] })
      : el("p", { class: "muted" }, "no runs yet: `retort run PIPELINE` makes one")];
}

async function pageRun(run) {
  const data = await api("run", { run });
  const out = [el("h2", {}, `run ${data.run} · ${data.pipeline} `, status(data.status)),
    el("dl", { class: "kv" }, el("dt", {}, "command"), el("dd", {}, `retort ${data.argv || ""}`),
      el("dt", {}, "spec"), el("dd", {}, data.spec || ""),
      el("dt", {}, "started"), el("dd", {}, text(data.started)),
      el("dt", {}, "finished"), el("dd", {}, text(data.finished)),
      el("dt", {}, "failures"), el("dd", {}, data.failures || data.tables.some((t) => t.errors)
        ? link(`#/failures/${data.run}`, `${data.failures} failed call(s); rows that did not parse`) : "none"))];
  if (data.stages.length) {
    const keys = ["rows_in", "rows_out", "calls_needed", "cache_hits", "calls_made", "failures", "parse_errors",
      "prompt_tokens", "completion_tokens"];
    out.push(el("h3", {}, "stages"), table(["stage", "kind", ...keys.map((k) => k.replace("_", " "))],
      data.stages.map((s) => [s.name, s.kind, ...keys.map((k) => s[k] ?? "")]),
      { id: "stages", numeric: keys.map((_, i) => i + 2) }));
  }
  out.push(el("h3", {}, "tables"));
  if (!data.kept) out.push(el("p", { class: "muted" }, "this run's tables were pruned; its calls are still cached"));
  else out.push(table(["table", "rows", "rows with _error", "columns"], data.tables.map((t) => [
    link(`#/table/${data.run}/${enc(t.name)}`, t.name), t.rows,
    t.errors ? link(`#/table/${data.run}/${enc(t.name)}?errors=only`, t.errors) : "0", t.columns.join(", ")]),
  { id: "tables", numeric: [1, 2] }));
  return out;
}

// The table page keeps its state (search, filters, sort, page) in the URL, so a view can be linked.
async function pageTable(run, name, params) {
  const state = {
    q: params.get("q") || "", f: params.getAll("f"), errors: params.get("errors") || "",
    sort: params.get("sort") || "", desc: params.get("desc") || "", offset: Number(params.get("offset") || 0),
  };
  const title = run === "main" ? `record table ${name}` : `run ${run} · ${name}`;
  const body = el("div", { id: "table-body" });
  const search = el("input", { type: "search", id: "search", placeholder: "search every column", value: state.q,
    "aria-label": "search every column" });
  const errors = el("select", { id: "errors", "aria-label": "rows with a parse error" },
    el("option", { value: "" }, "all rows"), el("option", { value: "only" }, "only rows with _error"),
    el("option", { value: "none" }, "only rows without _error"));
  errors.value = state.errors;
  const column = el("select", { id: "filter-column", "aria-label": "filter column" });
  const value = el("input", { id: "filter-value", placeholder: "value (empty: NULL)", "aria-label": "filter value" });
  const chips = el("span", { id: "filters" });

  function remember() {
    const query = new URLSearchParams();
    if (state.q) query.set("q", state.q);
    for (const f of state.f) query.append("f", f);
    for (const key of ["errors", "sort", "desc"]) if (state[key]) query.set(key, state[key]);
    if (state.offset) query.set("offset", state.offset);
    const hash = `#/table/${run}/${enc(name)}${query.toString() ? "?" + query : ""}`;
    history.replaceState(null, "", hash);
  }

  async function load() {
    remember();
    document.body.dataset.state = "loading";
    const data = await api("table", { run, table: name, q: state.q, f: state.f, errors: state.errors,
      sort: state.sort, desc: state.desc, offset: state.offset });
    clearError();
    if (!column.options.length) for (const c of data.columns) column.append(el("option", { value: c }, c));
    errors.parentElement.hidden = !data.columns.includes("_error");
    chips.replaceChildren(...state.f.map((f) => el("span", { class: "chip" }, f,
      el("button", { type: "button", title: "remove this filter", onclick: () => {
        state.f = state.f.filter((x) => x !== f); state.offset = 0; load().catch(failed);
      } }, "×"))));
    const idIndex = data.columns.indexOf("_id");
    const head = el("tr", {}, data.columns.map((c) => el("th", {
      class: `sortable${state.sort === c ? " sorted" + (state.desc ? " desc" : "") : ""}`, title: "sort",
      onclick: () => {
        if (state.sort === c) state.desc = state.desc ? "" : "1"; else { state.sort = c; state.desc = ""; }
        load().catch(failed);
      } }, c)));
    const rows = data.rows.map((r) => el("tr", {}, r.map((v, i) => {
      const col = data.columns[i];
      const cls = [v === null ? "null" : col === "_error" ? "err" : null, col === "_call" || col === "key" ? "key" : null]
        .filter(Boolean).join(" ") || null;
      const content = i === idIndex && run !== "main" && v !== null
        ? link(`#/row/${run}/${enc(name)}/${enc(v)}`, v) : text(v);
      return el("td", { class: cls, title: typeof v === "string" && v.length > 40 ? v : null }, content);
    })));
    const last = Math.min(data.offset + data.rows.length, data.total);
    const pager = el("div", { class: "pager" },
      el("span", { id: "count", "data-total": data.total, "data-shown": data.rows.length },
        data.total ? `rows ${data.offset + 1}–${last} of ${data.total}` : "no rows match"),
      el("button", { type: "button", disabled: data.offset === 0, onclick: () => {
        state.offset = Math.max(0, state.offset - data.limit); load().catch(failed);
      } }, "previous"),
      el("button", { type: "button", disabled: last >= data.total, onclick: () => {
        state.offset += data.limit; load().catch(failed);
      } }, "next"));
    body.replaceChildren(pager, el("div", { class: "wrap" },
      el("table", { id: "rows" }, el("thead", {}, head), el("tbody", {}, rows))));
    document.body.dataset.state = "ready";
  }

  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = search.value; state.offset = 0; load().catch(failed); }, 200);
  });
  errors.addEventListener("change", () => { state.errors = errors.value; state.offset = 0; load().catch(failed); });
  const add = el("button", { type: "button", id: "filter-add", onclick: () => {
    state.f.push(`${column.value}=${value.value}`); value.value = ""; state.offset = 0; load().catch(failed);
  } }, "add filter");
  const back = run === "main" ? link("#/", "runs") : link(`#/run/${run}`, `run ${run}`);
  const page = [el("h2", {}, back, " · ", title.split(" · ").pop()),
    el("div", { class: "controls" }, search, el("span", {}, errors)),
    el("div", { class: "controls" }, "where", column, "=", value, add, chips), body];
  await load();
  return page;
}

function messages(call) {
  return el("div", { class: "messages" }, call.messages.map((m) => el("div", { class: "message", "data-role": m.role },
    el("div", { class: "role" }, m.role), el("pre", { class: "content" }, text(m.content)))));
}

async function pageRow(run, name, id) {
  const data = await api("lineage", { run, table: name, id });
  const out = [el("h2", {}, link(`#/table/${run}/${enc(name)}`, `run ${run} · ${name}`), ` · row ${data.row_id}`),
    el("div", { class: "path", id: "path" }, data.steps.map((s) => `${s.stage} ${s.row_id}`).join("  →  "))];
  if (data.duplicates) out.push(el("p", { class: "muted" }, `${data.duplicates} more row(s) have this _id; this is the first`));
  let before = {};
  for (const step of data.steps) {
    const fields = Object.entries(step.row).filter(([k, v]) => !LINEAGE.includes(k) &&
      (!(k in before) || JSON.stringify(before[k]) !== JSON.stringify(v)));
    const section = el("section", { class: `step${step.error ? " failed" : ""}`, "data-stage": step.stage },
      el("h3", {}, run === "main" ? step.stage : link(`#/table/${run}/${enc(step.stage)}`, step.stage),
        ` · row ${step.row_id}`));
    if (step.passes) section.append(el("p", { class: "note" }, `the row of ${step.passes}, passed through (its prompt and completion are above)`));
    if (step.note) section.append(el("p", { class: "note" }, step.note));
    if (fields.length) section.append(el("dl", { class: "kv" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, text(v))])));
    if (step.call) {
      const c = step.call;
      section.append(el("div", { class: "label" }, "prompt"), messages(c),
        el("div", { class: "label" }, "completion"), el("pre", { class: "completion" }, text(c.text)),
        el("div", { class: "meta" }, `${c.model} · ${c.prompt_tokens ?? 0} + ${c.completion_tokens ?? 0} tokens · ` +
          `${c.latency_ms === null ? "" : Math.round(c.latency_ms) + " ms · "}` +
          `${c.finish_reason ? "finish " + c.finish_reason + " · " : ""}` +
          `made by stage ${c.stage} in run ${c.run_id} · call ${c.key.slice(0, 16)}`));
    } else if (step.row._call && !step.passes) {
      section.append(el("p", { class: "note" }, `call ${step.row._call} is not in the cache`));
    }
    if (step.error) section.append(el("div", { class: "error" }, `error: ${step.error}`));
    out.push(section);
    before = step.row;
  }
  if (data.children.length) {
    out.push(el("h3", {}, "made from this row"), el("ul", { id: "children" }, data.children.map(([stage, child]) =>
      el("li", {}, link(`#/row/${run}/${enc(stage)}/${enc(child)}`, `${stage} ${child}`)))));
  }
  return out;
}

async function pageFailures(run) {
  const data = await api("failures", { run });
  return [el("h2", {}, link(`#/run/${run}`, `run ${run}`), " · failures"),
    el("h3", {}, `calls that failed after their retries (${data.calls.length})`),
    data.calls.length ? table(["stage", "made from", "status", "error", "at"], data.calls.map((f) =>
      [f.stage, f.source ? link(`#/row/${run}/${enc(f.source)}/${enc(f.row)}`, `${f.source} ${f.row}`) : f.row ?? "",
        f.status ?? "", f.error, text(f.at).slice(0, 19)]), { id: "failed-calls", wrap: [3] })
      : el("p", { class: "muted" }, "none"),
    el("h3", {}, `rows whose completion did not parse (${data.parse.length})`),
    data.parse.length ? table(["table", "row", "error", "completion"], data.parse.map((p) =>
      [p.table, link(`#/row/${run}/${enc(p.table)}/${enc(p.id)}`, p.id), p.error, text(p.raw)]),
    { id: "parse-errors", wrap: [2, 3] })
      : el("p", { class: "muted" }, "none")];
}

async function pageReports() {
  const response = await fetch("/api/reports");
  const data = await response.json();
  if (!data.reports.length) {
    return [el("h2", {}, "comparison reports"),
      el("p", { class: "muted" }, `none in ${data.folder}: \`retort compare SPEC\` writes them there`)];
  }
  return [el("h2", {}, "comparison reports"), table(["report", "written", "file"], data.reports.map((r) =>
    [link(`#/report/${r.path.split("/").map(enc).join("/")}`, r.title), r.modified, r.path]), { id: "reports" })];
}

function pageReport(path) {
  const src = `/reports/${path.split("/").map(enc).join("/")}`;
  return [el("h2", {}, link("#/reports", "comparison reports"), ` · ${path}`),
    el("p", {}, link(src, "open on its own")),
    el("iframe", { class: "report", src, sandbox: "", title: `comparison report ${path}` })];
}

// --------------------------------------------------------------------------- routing

async function records() {
  try {
    const data = await api("runs");
    document.getElementById("records").replaceChildren("records: ",
      ...data.records.map((name) => [link(`#/table/main/${enc(name)}`, name), " "]).flat());
  } catch (error) { /* the page itself shows the error */ }
}

async function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  switch (parts[0]) {
    case "run": return pageRun(parts[1]);
    case "table": return pageTable(parts[1], parts[2], params);
    case "row": return pageRow(parts[1], parts[2], parts.slice(3).join("/"));
    case "failures": return pageFailures(parts[1]);
    case "reports": return pageReports();
    case "report": return pageReport(parts.slice(1).join("/"));
    default: return pageRuns();
  }
}

async function render() {
  document.body.dataset.state = "loading";
  try {
    const content = await route();
    clearError();
    main.replaceChildren(...content.flat());
  } catch (error) {
    showError(error);
    main.replaceChildren(el("p", { class: "muted" }, "nothing to show; see the message above"));
  }
  document.body.dataset.state = "ready";
}

window.addEventListener("hashchange", render);
records();
render();
