// The edge status page: hash routes over /api/v1, live through /api/v1/stream (SSE).
// No framework, nothing from the internet. Every text from the agent is escaped.
"use strict";

const view = document.getElementById("view");
let stream = null;          // the EventSource of the current page
let session = null;         // {user, csrf} once logged in
let overview = null;        // the last overview event
let shown = 0;              // counts the pages shown: what an earlier one asked for is ignored

const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "–");
const bytes = (n) => (n >= 1 << 30 ? (n / (1 << 30)).toFixed(1) + " GiB"
  : n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : n >= 1024 ? (n / 1024).toFixed(1) + " KiB"
  : n + " B");
const age = (s) => (s >= 3600 ? (s / 3600).toFixed(1) + " h" : s >= 60 ? (s / 60).toFixed(1) + " min"
  : s.toFixed(1) + " s");

async function api(path, options = {}) {
  const headers = {"Accept": "application/json", ...(options.headers || {})};
  if (options.method && options.method !== "GET" && session) headers["X-CSRF-Token"] = session.csrf;
  const r = await fetch("/api/v1/" + path, {...options, headers, credentials: "same-origin"});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(body.error || r.statusText), {status: r.status});
  return body;
}

// fn, run only while the page that made it is still the one shown (a late answer or a
// stream event of the page before must not draw over the current one)
function fresh(fn) {
  const mine = shown;
  return (...args) => (mine === shown ? fn(...args) : undefined);
}

// a new page: the previous one's stream is closed, its callbacks are ignored from now on
function newPage() {
  shown += 1;
  if (stream) { stream.close(); stream = null; }
}

function live(query, handlers) {
  if (stream) stream.close();
  stream = new EventSource("/api/v1/stream" + query);
  for (const [name, fn] of Object.entries(handlers)) {
    const handler = fresh(fn);
    stream.addEventListener(name, (e) => handler(JSON.parse(e.data)));
  }
  stream.addEventListener("overview", (e) => header(JSON.parse(e.data)));
}

function header(o) {
  overview = o;
  document.getElementById("node").textContent = o.agent.node;
  const link = document.getElementById("link");
  link.textContent = o.uplink.connected ? "uplink connected" : "uplink down " + age(o.uplink.down_for_s);
  link.className = "pill " + (o.uplink.connected ? "connected" : "disconnected");
}

function card(title, value, note = "") {
  return `<div class="card"><small>${esc(title)}</small><b>${value}</b><small>${note}</small></div>`;
}

// -- pages ----------------------------------------------------------------------------

function pageOverview() {
  const draw = (o) => {
    const c = o.config, h = o.host, u = o.uplink, b = o.outbox;
    view.innerHTML = `<h2>Gateway ${esc(o.agent.node)}</h2><div class="cards">
      ${card("Agent", "edge " + esc(o.agent.version), "up " + age(o.agent.uptime_s) + ", pid " + o.agent.pid +
        (o.agent.release ? ", pushed release" : ", package release"))}
      ${card("Configuration", "version " + esc(c.applied), esc(c.version) +
        (c.pending ? ` · <span class="pending">pending ${esc(c.pending)}</span>` : "") +
        (c.last_error ? `<br><span class="bad">${esc(c.last_error)}</span>` : ""))}
      ${card("Uplink", `<span class="${u.connected ? "connected" : "disconnected"}">${u.connected
        ? "connected" : "down"}</span>`, esc(u.broker) + " · " + u.publish_rate.toFixed(0) +
        " msg/s · " + u.reconnects + " reconnects")}
      ${card("Outbox", b.rows + " queued", bytes(b.bytes) + (b.rows ? " · oldest " + age(b.oldest_age_s) : ""))}
      ${card("Devices", `${o.devices.online} / ${o.devices.total} online`,
        o.devices.offline ? `<span class="bad">${o.devices.offline} offline</span>` : "")}
      ${card("Agent CPU", h.cpu_percent.toFixed(1) + " %", "RSS " + bytes(h.rss_bytes))}
      ${card("Host", h.memory_percent + " % memory used", "disk free " + bytes(h.disk_free_bytes))}
      ${h.temperature_c != null ? card("Temperature", h.temperature_c.toFixed(1) + " °C", "SoC (thermal zone 0)")
        : card("Temperature", "–", "not available on this machine")}
    </div>`;
  };
  api("overview").then(fresh(draw)).catch(fresh(failed));
  live("", {overview: draw});
}

// "profile eastron-sdm630, firmware 2.3" after sep, or "" for a device without profile
function profileText(profile, sep) {
  if (!profile) return "";
  return `${sep}profile ${esc(profile.name)}${profile.firmware ? ", firmware " + esc(profile.firmware) : ""}`;
}

function pageDevices() {
  const draw = (devices) => {
    view.innerHTML = `<h2>Devices</h2><div class="scroll"><table><tr><th>Device</th><th>State</th>
      <th>Endpoint</th><th>Last poll</th><th>Latency</th><th>Errors</th><th>Breaker</th></tr>
      ${devices.map((d) => `<tr><td><a href="#/device/${esc(d.key)}">${esc(d.key)}</a><br>
        <small class="muted">${esc(d.model)}${profileText(d.profile, " · ")}</small></td>
        <td class="${esc(d.state)}">${esc(d.state)}</td>
        <td>${esc(d.endpoint)} · unit ${d.unit_id}</td><td>${when(d.last_poll)}</td>
        <td>${d.last_latency_ms != null ? d.last_latency_ms.toFixed(1) + " ms" : "–"}</td>
        <td>${Object.entries(d.errors).filter(([, n]) => n).map(([k, n]) => esc(k) + " " + n)
          .join("<br>") || "0"}${d.last_error ? `<br><small class="bad">${esc(d.last_error)}</small>` : ""}</td>
        <td>${esc(d.breaker)}</td></tr>`).join("")}</table></div>`;
  };
  const load = fresh(() => api("devices").then(fresh(draw)).catch(fresh(failed)));
  load();
  live("", {overview: load});
}

function chart(points) {
  if (points.length < 2) return `<svg class="trend"></svg>`;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => ((x - x0) / (x1 - x0 || 1)) * 300;
  const sy = (y) => 58 - ((y - y0) / (y1 - y0 || 1)) * 56;
  return `<svg class="trend" viewBox="0 0 300 60" preserveAspectRatio="none">
    <polyline points="${points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")}"/>
    </svg><small class="muted">${y0} … ${y1} over ${age((x1 - x0) / 1000)}</small>`;
}

function pageDevice(key) {
  let device = null, trend = {};
  const draw = () => {
    const latest = device.latest || {values: {}, quality: {}};
    view.innerHTML = `<h2>${esc(device.key)} <span class="${esc(device.state)}">${esc(device.state)}</span></h2>
      <p class="muted">${esc(device.model)}${profileText(device.profile, " · ")} · ${esc(device.endpoint)} · unit ${device.unit_id} ·
        reading ${latest.seq ?? "–"} at <span id="ts">${when(latest.ts)}</span></p>
      <div class="scroll"><table><tr><th>Property</th><th>Value</th><th>Twin</th><th>Trend (5 min)</th></tr>
      ${device.properties.map((p) => {
        const bad = (latest.quality || {})[p.name] === "bad";
        const twin = device.twin[p.name] || {};
        const desired = twin.observedDesired ? "observed desired " + esc(twin.observedDesired.value) : "";
        return `<tr><td>${esc(p.name)}<br><small class="muted">${esc(p.access)} · ${esc(p.table)}
          ${p.address}${p.desired != null ? " · desired " + esc(p.desired) : ""}</small></td>
          <td class="value${bad ? " bad" : ""}" data-prop="${esc(p.name)}">${bad ? "bad read"
            : esc(latest.values[p.name])} ${esc(p.unit || "")}</td>
          <td><small>${twin.reported ? "reported " + esc(twin.reported.value) : ""}<br>${desired}</small></td>
          <td>${trend[p.name] ? chart(trend[p.name]) : ""}</td></tr>`;
      }).join("")}</table></div>`;
  };
  Promise.all([api("devices/" + key), api("devices/" + key + "/trend")]).then(fresh(([d, t]) => {
    device = d; trend = t; draw();
    live("?device=" + encodeURIComponent(key), {reading: (r) => {
      device.latest = r;
      for (const [prop, v] of Object.entries(r.values)) {
        if (typeof v === "number" || typeof v === "boolean") {  // times and trends in ms
          const points = (trend[prop] = trend[prop] || []);
          const ts = (r.times || {})[prop] ?? r.ts;
          if (!points.length || ts - points[points.length - 1][0] >= 2000) points.push([ts, Number(v)]);
          while (points.length && points[0][0] < ts - 300000) points.shift();
        }
      }
      draw();
    }});
  })).catch(fresh(failed));
}

function loginForm() {
  return `<form class="login" id="login"><input name="user" placeholder="user" autocomplete="username">
    <input name="password" type="password" placeholder="password" autocomplete="current-password">
    <button>Log in to change things</button><span id="loginerr" class="bad"></span></form>`;
}

function wireLogin(then) {
  const form = document.getElementById("login");
  if (!form) return;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      session = await api("login", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({user: form.user.value, password: form.password.value})});
      who();
      then();
    } catch (err) { document.getElementById("loginerr").textContent = err.message; }
  });
}

function pageConfig() {
  Promise.all([api("config"), api("config/versions")]).then(fresh(([c, versions]) => {
    const options = versions.map((v) => `<option>${v.version}</option>`).join("");
    const backTo = versions.filter((v) => v.state === "superseded").length;
    const nothing = versions.length === 0 ? "No versions are kept yet."
      : backTo ? "" : "Nothing to roll back to" + (versions.length === 1 ? " (only one version)."
        : " (no earlier version that was not rolled back).");
    view.innerHTML = `<h2>Configuration</h2><p>Running version <b>${esc(c.applied)}</b>
      (${esc(c.version)})${c.pending ? `, <span class="pending">version ${esc(c.pending)} in its health window</span>` : ""}.
      ${c.last_error ? `<br><span class="bad">${esc(c.last_error)}</span>` : ""}</p>
      <div class="scroll"><table><tr><th>Version</th><th>State</th><th>Received</th><th>Decided</th>
      <th>Devices</th><th>Why</th><th></th></tr>${versions.slice().reverse().map((v) => `<tr>
        <td>${v.version}</td><td class="${esc(v.state)}">${esc(v.state)}</td><td>${when(v.received)}</td>
        <td>${when(v.decided)}</td><td>${v.version === 0 ? "agent file" +
          (v.devices != null ? ` (${v.devices})` : "") : v.devices}</td>
        <td>${esc(v.reason)}</td><td>${v.state === "superseded" ? `<button data-v="${v.version}">Roll back to it</button>` : ""}</td>
        </tr>`).join("")}</table></div>
      ${nothing ? `<p class="notice" id="nothing">${esc(nothing)}</p>` : ""}
      ${session ? "" : loginForm()}
      <p id="rolled"></p>
      <h2>Diff</h2><p><select id="old">${options}</select> → <select id="new">${options}</select>
      <button id="diff">Show</button></p><pre id="lines"></pre>`;
    document.getElementById("new").selectedIndex = versions.length - 1;
    wireLogin(pageConfig);
    document.getElementById("diff").onclick = () => api(`config/diff?old=${
      document.getElementById("old").value}&new=${document.getElementById("new").value}`)
      .then(fresh((d) => { document.getElementById("lines").innerHTML = d.lines.length
        ? d.lines.map((l) => `<span class="${l[0] === "+" ? "add" : l[0] === "-" ? "del" : ""}">${
          esc(l)}</span>`).join("\n")
        : `<span class="muted">no differences${d.old === d.new ? " (the same version)" : ""}</span>`; }))
      .catch(fresh(failed));
    for (const b of view.querySelectorAll("button[data-v]")) {
      b.onclick = () => api("config/rollback", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({version: Number(b.dataset.v)})})
        .then(() => { document.getElementById("rolled").textContent =
          `Asked to roll back to version ${b.dataset.v}; it happens within a second.`; })
        .catch((err) => { document.getElementById("rolled").textContent = err.status === 401 ||
          err.status === 403 ? "Log in first." : err.message; });
    }
  })).catch(fresh(failed));
  live("", {});
}

function pageEvents() {
  let events = [];
  const draw = () => {
    view.innerHTML = `<h2>Events</h2><div class="scroll"><table><tr><th>When</th><th>Type</th><th>What</th></tr>
      ${events.slice().reverse().map((e) => {
        const {ts, type, ...rest} = e;
        return `<tr><td>${when(ts)}</td><td>${esc(type)}</td><td><small>${esc(JSON.stringify(rest))}</small></td></tr>`;
      }).join("")}</table></div>`;
  };
  api("events").then(fresh((e) => { events = e; draw(); })).catch(fresh(failed));
  live("", {events: (more) => { events = events.concat(more).slice(-200); draw(); }});
}

function pagePlugins() {
  const us = (v) => (v >= 1000 ? (v / 1000).toFixed(2) + " ms" : v.toFixed(0) + " µs");
  const draw = (answer) => {
    const plugins = answer.plugins;
    const problems = answer.problems.length ? `<div class="notice"><b class="bad">The last change
      of the plugin directory was not taken</b> (what ran before goes on):<ul>${answer.problems
        .map((p) => `<li><small>${esc(p)}</small></li>`).join("")}</ul></div>` : "";
    if (!plugins.length) {
      view.innerHTML = `<h2>Plugins</h2>${problems}<p class="notice">No WASM plugin is configured. Put
        plugin manifests in the agent file's <code>plugins.dir</code> (they are picked up
        while the agent runs), or send them in a desired bundle; plugins/README.md says how.</p>`;
      return;
    }
    view.innerHTML = `<h2>Plugins</h2>${problems}<p class="muted">In the order they run on each
      poll's readings. Counters since the agent started, over every version of a plugin.</p>
      <div class="scroll"><table>
      <tr><th>Plugin</th><th>State</th><th>Devices</th><th>Calls</th><th>Failures</th>
      <th>Fallbacks</th><th>Time per call</th></tr>
      ${plugins.map((p) => p.state === "not loaded"
        ? `<tr><td>${esc(p.name)}</td><td class="offline">not loaded</td>
           <td colspan="5"><small class="bad">${esc(p.load_error)}</small></td></tr>`
        : `<tr><td>${esc(p.name)} ${esc(p.version)}<br><small class="muted">${esc(p.sha256.slice(0, 12))}</small></td>
        <td class="${p.state === "running" ? "online" : "offline"}">${esc(p.state)}</td>
        <td>${p.devices.map(esc).join("<br>")}</td><td>${p.calls}</td>
        <td>${p.errors + p.traps + p.timeouts ? `errors ${p.errors}<br>traps ${p.traps}<br>timeouts ${p.timeouts}`
          : "0"}${p.last_error ? `<br><small class="bad">${esc(p.last_error)}</small>` : ""}
          ${p.load_error ? `<br><small class="bad">${esc(p.load_error)}</small>` : ""}</td>
        <td>${p.passed} passed<br>${p.dropped} dropped<br><small class="muted">on failure: ${esc(p.on_failure)}</small></td>
        <td>p50 ${us(p.p50_us)}<br>p99 ${us(p.p99_us)}</td></tr>`).join("")}</table></div>`;
  };
  const load = fresh(() => api("plugins").then(fresh(draw)).catch(fresh(failed)));
  load();
  live("", {overview: load});
}

// a rule's mode: failsafe rules always hold, the others as their policy's mode
const ruleMode = (r) => (r.section === "failsafe" ? "always" : r.enforce ? "enforce" : "audit");
const count = (n) => Number(n).toLocaleString("en-US");

function policyState(p) {
  const modes = {};  // policy name -> its mode, from its rules
  for (const r of p.rules) if (r.policy != null) modes[r.policy] = ruleMode(r);
  const names = Object.entries(modes).map(([n, m]) => `${esc(n)} (${m})`).join(", ");
  const held = `${Object.keys(modes).length} polic${Object.keys(modes).length === 1 ? "y" : "ies"}${
    names ? ": " + names : ""}, ${p.rules.length} rules`;
  if (p.state === "enforced") {
    return `<div class="notice ok" id="state"><b class="enforced">Enforced</b>: the kernel holds
      the policy (${held}). Denied connections of the selected workloads are dropped
      (audit policies only report them).</div>`;
  }
  if (p.state === "unenforced") {
    return `<div class="notice alert" id="state"><b class="unenforced">NOT enforced</b>: ${esc(p.reason)}
      <br>A policy is configured (${held}) but the kernel does not hold it: connections are
      <b>not policed</b>.</div>`;
  }
  return `<div class="notice" id="state"><b>No policy configured</b>: nothing is policed.
    ${p.reason && p.reason !== "no policy is configured" ? `<br><small>${esc(p.reason)}</small>` : ""}
    <br><small>Policies come from the agent file's <code>policy.policies</code> or a desired
    bundle's <code>policies</code> (README: "Network policy").</small></div>`;
}

const DROPS_SHOWN = 50;  // of the 200 the agent keeps

function policyRules(p, counted) {
  return `<h2>Rules</h2><p class="muted">In match order: the first rule that matches a
    connection decides. ${counted ? "Counters since the policy was last applied."
      : "Not in the kernel: nothing is counted."}</p>
    <div class="scroll"><table id="rules" class="stack"><tr class="head"><th>#</th><th>Action</th>
    <th>Direction</th><th>Mode</th><th class="num">Packets</th><th class="num">Bytes</th><th>Rule</th></tr>
    ${p.rules.map((r) => `<tr><td class="id">${r.id}</td>
      <td class="${r.action === "deny" ? "bad" : ""}">${esc(r.action)}</td>
      <td>${esc(r.direction)}</td><td class="mode-${ruleMode(r)}">${ruleMode(r)}</td>
      <td class="num" data-label="packets">${counted ? count(r.packets) : "–"}</td>
      <td class="num" data-label="bytes">${counted ? bytes(r.bytes) : "–"}</td>
      <td class="wide">${esc(r.where)}<br><small class="muted">${esc(r.what)}${r.workload
        ? " · " + esc(r.workload) : ""}</small></td></tr>`).join("")}</table></div>`;
}

function policyDrops(p) {
  const d = p.datapath, drops = p.drops;
  const lost = d.events_lost ? ` · <span class="bad">${count(d.events_lost)} events lost</span>` : "";
  const shown = p.recent.slice(-DROPS_SHOWN).reverse();
  return `<h2>Recent drops</h2>
    <p class="muted">${count(drops.drop || 0)} dropped, ${count(drops["would-drop"] || 0)} would-drop
    (audit: reported, passed) since the agent started${lost}; one per dropped packet, one per flow for audit, newest first${
      p.recent.length > shown.length ? ` (the last ${shown.length})` : ""}.</p>
    ${shown.length ? `<div class="scroll"><table id="drops" class="stack"><tr class="head"><th>When</th>
      <th>Verdict</th><th>Direction</th><th>Remote</th><th>Workload</th><th>Rule</th></tr>
      ${shown.map((e) => `<tr><td>${when(e.time_ms)}</td>
        <td><span class="verdict ${e.verdict === "drop" ? "drop" : "would-drop"}">${e.verdict === "drop"
          ? "dropped" : "would drop (audit)"}</span></td><td>${esc(e.direction)}</td>
        <td>${esc(e.address)} ${esc(e.protocol)}${e.port ? " " + e.port : ""}</td>
        <td class="wide"><code>${esc(e.workload)}</code></td>
        <td class="wide">#${e.rule} <small class="muted">${esc(e.where)}</small></td></tr>`).join("")}
      </table></div>` : `<p class="muted">None.</p>`}`;
}

function pagePolicy() {
  const draw = (p) => {
    const counted = p.state === "enforced";
    const applied = p.applied_ms ? `${counted ? "Applied" : "Last applied"} ${when(p.applied_ms)}
      in ${p.update_ms.toFixed(1)} ms (${p.updates === 1 ? "once" : p.updates + " times"} since the
      agent started; each zeroes the counters) · pinned at <code>${esc(p.pin)}</code>`
      : "Never put into the kernel.";
    // an unenforced policy's cgroups were never looked up: its workloads from the rules
    const workloads = Object.entries(p.workloads).length ? Object.entries(p.workloads)
      : [...new Set(p.rules.map((r) => r.workload).filter((w) => w != null))].map((w) => [w, undefined]);
    view.innerHTML = `<h2>Network policy</h2>${policyState(p)}
      ${p.state === "off" && !p.rules.length ? "" : `<p class="muted">${applied}</p>`}
      ${workloads.length ? `<h2>Workloads</h2><div class="scroll"><table id="workloads">
        <tr><th>Workload (cgroup)</th><th>cgroup id</th></tr>
        ${workloads.map(([path, id]) => `<tr><td><code>${esc(path)}</code></td>
          <td class="${id === null ? "offline" : ""}">${id === undefined ? "– (not looked up: not enforced)"
            : id === null ? "not running (no such cgroup now)" : esc(id)}</td></tr>`).join("")}
        </table></div>` : ""}
      ${p.rules.length ? policyRules(p, counted) : ""}
      ${p.state === "off" && !p.recent.length ? "" : policyDrops(p)}`;
  };
  const load = fresh(() => api("policy").then(fresh(draw)).catch(fresh(failed)));
  load();
  live("", {overview: load});
}

function pageMissing(hash) {
  view.innerHTML = `<h2>No such page</h2><p class="notice">There is no page <code>#${esc(hash)}</code>
    here. The pages are: ${[...document.querySelectorAll("nav a")].map((a) =>
      `<a href="${esc(a.getAttribute("href"))}">${esc(a.textContent)}</a>`).join(" · ")}.</p>`;
  live("", {});
}

// the login form in place of the page (the header's "Log in", or a page that needs it);
// a login shows the page again
function pageLogin() {
  newPage();
  view.innerHTML = `<h2>Log in</h2>${loginForm()}`;
  wireLogin(route);
  live("", {});
}

function failed(err) {
  if (err.status === 401) {  // viewing needs a login from here (web.view, or not loopback)
    pageLogin();
    return;
  }
  if (stream) { stream.close(); stream = null; }  // nothing of this page is live
  view.innerHTML = `<p class="bad">${esc(err.message)}</p>`;
  live("", {});  // the header goes on
}

async function who() {
  try { session = await api("session"); } catch { session = null; }
  const el = document.getElementById("who");
  el.textContent = session ? "logged in as " + session.user + " " : "";
  const button = document.createElement("button");
  button.id = "loginlink";
  if (session) {
    button.textContent = "Log out";
    button.onclick = () => api("logout", {method: "POST"}).catch(() => {}).then(() => {
      session = null; who(); route(); });
  } else {
    button.textContent = "Log in";
    button.onclick = pageLogin;
  }
  el.appendChild(button);
}

function route() {
  newPage();
  let hash = location.hash.slice(1) || "/";
  if (!hash.startsWith("/")) {  // #devices is #/devices
    hash = "/" + hash;
    history.replaceState(null, "", "#" + hash);
  }
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("on", a.getAttribute("href") === "#" + hash);
  }
  if (hash.startsWith("/device/")) {
    const key = hash.slice(8);
    return /^[^/]+\/[^/]+$/.test(key) ? pageDevice(key) : pageMissing(hash);
  }
  const pages = {
    "/": pageOverview, "/devices": pageDevices, "/config": pageConfig, "/events": pageEvents,
    "/policy": pagePolicy, "/plugins": pagePlugins,
  };
  (pages[hash] || (() => pageMissing(hash)))();
}

window.addEventListener("hashchange", route);
who();
api("overview").then(header).catch(() => {});
route();
