// The nonstop dashboard: reads the daemon's API every 5 s and draws it. No
// framework, no network but the daemon. The session (from the login page)
// is in sessionStorage and goes in `Authorization: Session ...` on every
// call: no cookie, so nothing else on 127.0.0.1 ever receives it.
"use strict";
(function () {
  const $ = sel => document.querySelector(sel);
  const COLORS = ["#1f6feb", "#8250df", "#1a7f37", "#bc4c00", "#cf222e", "#0a7ea4"];
  const REFRESH_MS = 5000;
  const SESSION_KEY = "nonstop-session";
  // `shown`: the app and environment whose status is on the page (the
  // maintenance button acts on it only).
  const state = { envs: [], app: null, env: null, range: "15m", open: new Set(), maintenanceOn: false, shown: null, busy: false };

  function text(tag, content, cls) {
    const e = document.createElement(tag);
    if (content != null) e.textContent = content;
    if (cls) e.className = cls;
    return e;
  }
  function row(cells, cls) {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.append(c); else td.textContent = c == null ? "–" : String(c);
      tr.append(td);
    }
    return tr;
  }
  function pill(content, tone) { return text("span", content, "pill " + (tone || "neutral")); }
  function when(ms) { return ms ? new Date(ms).toLocaleString() : "–"; }
  function duration(ms) {
    if (ms == null) return "–";
    const s = Math.round(ms / 1000);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function notice(message, ok) {
    const n = $("#notice");
    n.textContent = message;
    n.className = "notice" + (ok ? " ok" : "");
    n.hidden = !message;
  }
  function scope() {
    const q = new URLSearchParams();
    if (state.app) q.set("app", state.app);
    if (state.env) q.set("env", state.env);
    return q.toString();
  }

  function toLogin() {
    sessionStorage.removeItem(SESSION_KEY);
    location.replace("/login");
  }

  async function api(path, options) {
    const session = sessionStorage.getItem(SESSION_KEY);
    if (!session) { toLogin(); throw new Error("unauthorized"); }
    const opts = Object.assign({ credentials: "omit" }, options || {});
    opts.headers = Object.assign({ "Authorization": "Session " + session }, opts.headers || {});
    const resp = await fetch(path, opts);
    if (resp.status === 401) { toLogin(); throw new Error("unauthorized"); }
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(body.message || resp.status + " " + resp.statusText);
    return body;
  }

  // ------------------------------------------------------------ environments

  function readHash() {
    const q = new URLSearchParams(location.hash.slice(1));
    if (q.get("app")) state.app = q.get("app");
    if (q.get("env")) state.env = q.get("env");
  }
  function writeHash() {
    history.replaceState(null, "", "#" + scope());
  }

  function health(e) {
    if (!e.running) return pill("down", "neutral");
    const tone = e.instances > 0 && e.ready === e.instances ? "good" : e.ready === 0 ? "bad" : "warning";
    return pill(e.ready + " / " + e.instances + " ready", tone);
  }
  function urlLinks(urls) {
    const span = document.createElement("span");
    for (const u of urls || []) {
      const a = text("a", u);
      a.href = u; a.target = "_blank"; a.rel = "noopener noreferrer";
      span.append(a, " ");
    }
    return urls && urls.length ? span : "–";
  }

  function applyEnvironments(envs) {
    state.envs = envs;
    if (!state.envs.some(e => e.app === state.app && e.environment === state.env)) {
      const first = state.envs.find(e => e.running) || state.envs[0];
      state.app = first ? first.app : null;
      state.env = first ? first.environment : null;
    }
    const select = $("#env-select");
    select.replaceChildren(...state.envs.map(e => {
      const o = text("option", e.app + " / " + e.environment);
      o.value = e.app + "\n" + e.environment;
      o.selected = e.app === state.app && e.environment === state.env;
      return o;
    }));
    const body = $("#env-table tbody");
    body.replaceChildren(...state.envs.map(e => {
      const selected = e.app === state.app && e.environment === state.env;
      const tr = row([e.app, e.environment, e.release == null ? "–" : "v" + e.release, health(e),
        e.operation || (e.running ? "running" : "down"), urlLinks(e.urls)], "clickable" + (selected ? " selected" : ""));
      tr.dataset.app = e.app; tr.dataset.env = e.environment;
      tr.addEventListener("click", ev => { if (ev.target.tagName !== "A") choose(e.app, e.environment); });
      return tr;
    }));
    writeHash();
  }

  function choose(app, env) {
    state.app = app; state.env = env; state.open.clear();
    // Until this environment's status is shown, the button has nothing
    // to act on.
    state.shown = null;
    $("#maintenance-toggle").disabled = true;
    writeHash();
    refresh();
  }

  // ------------------------------------------------------------------ status

  function renderStatus(st) {
    $("#env-title").textContent = st.app + " / " + st.environment;
    $("#release").textContent = "v" + st.release;
    const ready = st.processes.reduce((n, p) => n + p.ready, 0);
    const desired = st.processes.reduce((n, p) => n + p.desired, 0);
    $("#health").replaceChildren(pill(ready + " / " + desired + " ready",
      desired === 0 ? "neutral" : ready === desired ? "good" : ready === 0 ? "bad" : "warning"));
    $("#state").textContent = st.state || "running";
    $("#operation").textContent = st.operation || "none";
    const m = st.maintenance;
    state.maintenanceOn = !!m;
    state.shown = { app: st.app, env: st.environment };
    $("#maintenance-state").replaceChildren(m ? pill("on", "warning") : pill("off", "good"));
    if (m) $("#maintenance-state").append(text("div", "since " + when(m.since_ms) + " (" + m.by + ")", "muted small"));
    const toggle = $("#maintenance-toggle");
    toggle.textContent = m ? "Turn maintenance off" : "Turn maintenance on";
    toggle.className = m ? "" : "danger";
    toggle.disabled = state.busy;
    const env = state.envs.find(e => e.app === st.app && e.environment === st.environment);
    $("#urls").replaceChildren(text("span", "Served at: ", "muted"), urlLinks(env ? env.urls : []));

    $("#process-table tbody").replaceChildren(...st.processes.map(p => {
      const a = p.autoscale;
      const auto = a ? "min " + a.min + ", max " + a.max + (a.last_decision ? " · " + a.last_decision : "") : "–";
      const tone = p.desired === 0 ? "neutral" : p.ready === p.desired ? "good" : p.ready === 0 ? "bad" : "warning";
      const tr = row([p.process, p.kind, pill(p.ready + " / " + p.desired, tone), auto]);
      tr.dataset.process = p.process;
      return tr;
    }));
    const healthTone = { healthy: "good", pending: "warning", unhealthy: "bad", draining: "neutral" };
    const rows = st.instances.map(i => {
      const h = i.health ? pill(i.health, healthTone[i.health]) : pill(i.state === "running" ? "ready" : i.state,
        i.state === "running" ? "good" : "warning");
      const tr = row([i.instance + " (" + i.id + ")", i.state, h, "v" + i.release, i.pid, i.port, i.restarts,
        duration(i.uptime_ms)]);
      tr.dataset.instance = i.id;
      return tr;
    });
    for (const w of st.waiting || []) {
      rows.push(row([w.instance, w.state, pill(w.state, "bad"), "–", "–", "–", w.restarts,
        w.problem || w.last_exit || "retry in " + duration(w.retry_in_ms)]));
    }
    $("#instance-table tbody").replaceChildren(...rows);
  }

  // ----------------------------------------------------------------- history

  function renderHistory(deployments) {
    const box = $("#deployments");
    if (!deployments.length) { box.replaceChildren(text("p", "No deployments yet.", "muted")); return; }
    const statusTone = { succeeded: "good", running: "neutral", failed: "bad", rolled_back: "bad" };
    box.replaceChildren(...deployments.map((d, index) => {
      const det = document.createElement("details");
      det.className = "deployment";
      det.dataset.id = d.id;
      det.open = state.open.has(d.id) || (index === 0 && !state.open.has(-d.id));
      det.addEventListener("toggle", () => {
        if (det.open) { state.open.add(d.id); state.open.delete(-d.id); }
        else { state.open.delete(d.id); state.open.add(-d.id); }
      });
      const sum = document.createElement("summary");
      const to = (d.from_release != null ? "v" + d.from_release + " → " : "") + "v" + d.to_release;
      const took = d.finished_at_ms ? duration(d.finished_at_ms - d.started_at_ms) : "running";
      sum.append(text("span", "#" + d.id, "id"), text("span", d.kind), text("span", to),
        pill(d.status.replace("_", " "), statusTone[d.status]), text("span", "by " + d.who, "muted"),
        text("span", when(d.started_at_ms), "muted"), text("span", took, "muted"));
      if (d.message) sum.append(text("span", "“" + d.message + "”", "muted"));
      det.append(sum);
      const ol = document.createElement("ol");
      ol.className = "timeline";
      for (const s of d.timeline || []) {
        const li = text("li", null, s.tone);
        li.append(text("span", "+" + ((s.at_ms - d.started_at_ms) / 1000).toFixed(1) + " s", "at"),
          text("span", s.kind, "kind"), text("span", s.text));
        ol.append(li);
      }
      if (!(d.timeline || []).length) ol.append(text("li", "phase: " + d.phase + (d.reason ? " — " + d.reason : ""), "neutral"));
      else if (d.reason && d.status !== "succeeded") ol.append(text("li", d.reason, "bad"));
      det.append(ol);
      return det;
    }));
  }

  // ------------------------------------------------------------------ events

  const MARKER_KIND = {
    "deploy": "deploy", "rollback": "deploy", "promote": "deploy", "deployed": "ok",
    "rolled-back": "bad", "deploy-failed": "bad", "rollout-failed": "bad",
    "autoscale": "scale", "scale": "scale", "maintenance": "maint"
  };

  function renderEvents(events) {
    const recent = events.slice(-40).reverse();
    $("#event-table tbody").replaceChildren(...recent.map(e => row([when(e.at_ms), e.kind, e.instance, e.message])));
  }

  // ------------------------------------------------------------------ charts

  // Points before the first measured one are left out (a fresh daemon or
  // environment has a short past), keeping at least MIN_POINTS.
  const MIN_POINTS = 24;
  function trimmed(c) {
    const all = c.processes.flatMap(p => [p.requests_per_second, p.p95_ms, p.cpu_percent, p.instances]);
    const n = Math.max(0, ...all.map(a => a.length));
    let first = n;
    for (const a of all) { const i = a.findIndex(v => v != null); if (i >= 0) first = Math.min(first, i); }
    const from = Math.max(0, Math.min(first - 1, n - MIN_POINTS));
    const cut = a => a.slice(from);
    return Object.assign({}, c, {
      start_ms: c.start_ms + from * c.step_secs * 1000,
      processes: c.processes.map(p => ({
        process: p.process, requests_per_second: cut(p.requests_per_second), p95_ms: cut(p.p95_ms),
        error_rate: cut(p.error_rate), cpu_percent: cut(p.cpu_percent), instances: cut(p.instances),
      })),
    });
  }

  function renderCharts(full, events) {
    const c = trimmed(full);
    const stepMs = c.step_secs * 1000;
    const markers = events.filter(e => MARKER_KIND[e.kind])
      .map(e => ({ atMs: e.at_ms, kind: MARKER_KIND[e.kind], text: e.kind + ": " + e.message }));
    const series = pick => c.processes
      .map((p, i) => ({ name: p.process, color: COLORS[i % COLORS.length], values: pick(p) }))
      .filter(s => s.values.some(v => v != null));
    const num = v => (v >= 100 ? Math.round(v) : Math.round(v * 10) / 10).toString();
    const charts = [
      ["#chart-requests", p => p.requests_per_second, num, 1],
      ["#chart-p95", p => p.p95_ms, num, 1],
      ["#chart-errors", p => p.error_rate.map(v => v == null ? null : v * 100), v => num(v) + "%", 1],
      ["#chart-cpu", p => p.cpu_percent, v => num(v) + "%", 1],
      ["#chart-instances", p => p.instances, num, 2],
    ];
    for (const [sel, pick, format, minTop] of charts) {
      const fig = $(sel);
      const s = series(pick);
      NonstopCharts.render(fig.querySelector(".plot"), {
        title: fig.querySelector("figcaption").textContent, series: s, startMs: c.start_ms, stepMs, markers, format, minTop,
      });
    }
  }

  // ----------------------------------------------------------------- refresh

  // Each refresh has a generation; one that a later refresh (another
  // environment or range, a maintenance switch, the timer) has started
  // after it drops its answers, whenever they come: a late answer never
  // overwrites a newer one. `data-dropped` counts them (for the tests).
  let timer = null;
  let generation = 0;
  let dropped = 0;
  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    const stale = () => {
      if (mine === generation) return false;
      document.body.dataset.dropped = String(++dropped);
      return true;
    };
    try {
      const envs = await api("/v1/environments");
      if (stale()) return;
      applyEnvironments(envs);
      if (!state.app) {
        $("#env-title").textContent = "No environment yet: run `nonstop up` in an app directory.";
      } else {
        const q = scope();
        const [st, hist, events, charts] = await Promise.all([
          api("/v1/status?" + q), api("/v1/history?limit=20&" + q), api("/v1/events?limit=1000&" + q),
          api("/v1/charts?range=" + state.range + "&" + q),
        ]);
        if (stale()) return;
        renderStatus(st);
        renderHistory(hist);
        renderEvents(events);
        renderCharts(charts, events);
      }
      $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
      if ($("#notice").className === "notice") notice("");
    } catch (e) {
      if (stale()) return;
      if (e.message !== "unauthorized") notice("Could not read the daemon: " + e.message);
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  async function toggleMaintenance() {
    const shown = state.shown;
    if (!shown || shown.app !== state.app || shown.env !== state.env) return;
    const on = !state.maintenanceOn;
    const what = shown.app + " / " + shown.env;
    const question = on
      ? "Turn maintenance ON for " + what + "? Every request gets the maintenance page (503) until you turn it off."
      : "Turn maintenance OFF for " + what + "? Requests reach the app again.";
    if (!window.confirm(question)) return;
    state.busy = true;
    $("#maintenance-toggle").disabled = true;
    try {
      const q = new URLSearchParams({ app: shown.app, env: shown.env });
      await api("/v1/maintenance?" + q.toString(), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ on }),
      });
      notice("Maintenance is " + (on ? "on" : "off") + " for " + what + ".", true);
    } catch (e) {
      if (e.message !== "unauthorized") notice("Maintenance was not changed: " + e.message);
    }
    state.busy = false;
    refresh();
  }

  // Ends every session of the daemon (server side), then this tab's.
  async function logout() {
    try {
      await api("/logout", { method: "POST" });
    } catch (e) {
      // Logged out or not, this tab forgets its session.
      if (e.message !== "unauthorized") window.alert("This tab is logged out, but the daemon said: " + e.message);
    }
    toLogin();
  }

  async function start() {
    readHash();
    $("#env-select").addEventListener("change", ev => {
      const [app, env] = ev.target.value.split("\n");
      choose(app, env);
    });
    $("#maintenance-toggle").addEventListener("click", toggleMaintenance);
    $("#logout").addEventListener("click", logout);
    for (const b of document.querySelectorAll(".ranges button")) {
      b.addEventListener("click", () => {
        state.range = b.dataset.range;
        for (const o of document.querySelectorAll(".ranges button")) o.classList.toggle("on", o === b);
        refresh();
      });
    }
    if (!sessionStorage.getItem(SESSION_KEY)) { toLogin(); return; }
    refresh();
  }
  document.addEventListener("DOMContentLoaded", start);
})();
