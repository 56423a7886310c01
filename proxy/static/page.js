// The migration page: polls api/routes and updates the DOM in place. Every piece of data
// goes in through textContent or a property, never as markup.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const SHOWN_MISMATCHES = 5;
  const PALETTE = 5;
  const $ = (id) => document.getElementById(id);
  let lastOk = null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // Reuse children by key, create the missing, drop the gone, keep the order: open
  // <details>, scroll positions and selections survive a refresh.
  function sync(parent, items, keyOf, create, update) {
    const old = new Map();
    for (const child of parent.children) old.set(child.dataset.key, child);
    items.forEach((item, i) => {
      const key = String(keyOf(item));
      let node = old.get(key);
      if (node) {
        old.delete(key);
      } else {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
    });
    for (const node of old.values()) node.remove();
  }

  const percent = (x) => `${(x * 100).toFixed(1)}%`;
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
  const rate = (x) => (x === 0 ? "0" : x < 10 ? x.toFixed(2) : x.toFixed(1));
  // p95 comes from a histogram with ~19% wide buckets: more digits would be noise.
  const millis = (x) => `${x < 10 ? x.toFixed(1) : Math.round(x)} ms`;

  function colorOf(backend, legacy) {
    if (backend === legacy) return "legacy";
    let h = 0;
    for (const ch of backend) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    return `c${h % PALETTE}`;
  }

  // ---------------------------------------------------------------- header

  function renderHeader(data) {
    setText($("share"), percent(data.migrated_share));
    $("share-fill").style.width = percent(data.migrated_share);
    setText($("legacy"), data.legacy);
    document.title = `${percent(data.migrated_share)} migrated · strangler`;
    const reload = data.last_reload;
    const ok = reload.result === "success";
    $("reload").className = ok ? "ok" : "bad";
    const what = reload.initial ? "✓ loaded at start" : ok ? "✓ succeeded" : "✗ failed";
    setText($("reload"), `${what} at ${clock(reload.time)}`);
    sync($("reload-errors"), reload.errors, (e) => e, (e) => el("li", "", e), () => {});
  }

  // ---------------------------------------------------------------- a route's card

  function section(card, title) {
    const part = el("section", "part");
    part.append(el("h3", "", title));
    card.append(part);
    return part;
  }

  function createCard(route) {
    const card = el("article", "card");
    card.dataset.route = route.name;
    const head = el("header", "card-head");
    const parts = { badges: el("span", "badges"), match: el("dl", "match") };
    head.append(el("h2", "", route.name), parts.badges);
    card.append(head, parts.match);

    const split = section(card, "Split");
    parts.splitBar = el("div", "bar split");
    parts.legend = el("ul", "legend");
    split.append(parts.splitBar, parts.legend);

    const wrap = el("div", "table-wrap");
    const table = el("table", "backends");
    const caption = el("caption", "", "Backends, last 60 s");
    const headRow = el("tr");
    for (const label of ["Backend", "Breaker", "Req/s", "Errors", "p95", "Up"]) {
      const th = el("th", ["Req/s", "Errors", "p95"].includes(label) ? "num" : "", label);
      th.scope = "col";
      headRow.append(th);
    }
    const thead = el("thead");
    thead.append(headRow);
    parts.rows = el("tbody");
    table.append(caption, thead, parts.rows);
    wrap.append(table);
    card.append(wrap);

    const bulkhead = section(card, "Bulkhead");
    parts.bulkText = el("p", "bulk-text");
    const meter = el("div", "bar meter");
    parts.bulkFill = el("span", "fill");
    meter.append(parts.bulkFill);
    bulkhead.append(parts.bulkText, meter);

    parts.shadow = section(card, "Shadow");
    parts.shadowTitle = parts.shadow.firstChild;
    parts.shadowRate = el("p", "shadow-rate");
    parts.mismatches = el("ol", "mismatches");
    parts.shadow.append(parts.shadowRate, parts.mismatches);
    card.parts = parts;
    return card;
  }

  function renderMatch(dl, match) {
    const rows = [["prefix", match.prefix]];
    if (match.methods) rows.push(["methods", match.methods.join(" ")]);
    if (match.host) rows.push(["host", match.host]);
    for (const [name, value] of Object.entries(match.headers || {})) {
      rows.push(["header", `${name}: ${value}`]);
    }
    const signature = JSON.stringify(rows);
    if (dl.dataset.signature === signature) return;
    dl.dataset.signature = signature;
    dl.replaceChildren();
    for (const [label, value] of rows) {
      const dd = el("dd");
      dd.append(el("code", "", value));
      dl.append(el("dt", "", label), dd);
    }
  }

  function renderBadges(holder, route) {
    const badges = [];
    if (route.override) badges.push(["badge override", "override"]);
    if (route.fallback) badges.push(["badge neutral", `fallback → ${route.fallback}`]);
    if (route.name === "default") badges.push(["badge neutral", "unclaimed requests"]);
    sync(holder, badges, (b) => b[1], (b) => el("span", b[0], b[1]), () => {});
  }

  function renderSplit(parts, route, legacy) {
    const shares = Object.entries(route.split);
    const visible = shares.filter(([, pct]) => pct > 0);
    sync(parts.splitBar, visible, (s) => s[0], () => el("span", "seg"), (seg, [name, pct]) => {
      seg.className = `seg ${colorOf(name, legacy)}`;
      seg.style.width = `${pct}%`;
      seg.title = `${name} ${pct}%`;
    });
    sync(parts.legend, shares, (s) => s[0], () => {
      const li = el("li");
      li.append(el("span", "swatch"), el("span", "name"), el("span", "pct"));
      return li;
    }, (li, [name, pct]) => {
      li.firstChild.className = `swatch ${colorOf(name, legacy)}`;
      setText(li.children[1], name);
      setText(li.children[2], `${pct}%`);
    });
  }

  function createRow() {
    const tr = el("tr");
    const th = el("th");
    th.scope = "row";
    const breaker = el("td");
    breaker.append(el("span", "badge breaker"));
    tr.append(th, breaker, el("td", "num rps"), el("td", "num err"), el("td", "num p95"),
      el("td", "up"));
    return tr;
  }

  function updateRow(tr, [name, b]) {
    const cells = tr.children;
    setText(cells[0], name);
    const badge = cells[1].firstChild;
    badge.className = `badge breaker ${b.breaker}`;
    setText(badge, b.breaker);
    setText(cells[2], rate(b.rps));
    setText(cells[3], b.requests ? percent(b.error_rate) : "–");
    setText(cells[4], b.requests ? millis(b.p95_ms) : "–");
    setText(cells[5], b.up === null || b.up === undefined ? "–" : b.up ? "yes" : "no");
    cells[5].className = b.up === false ? "up down" : "up";
    cells[3].classList.toggle("bad", b.error_rate > 0);
  }

  function renderBulkhead(parts, bulkhead) {
    const used = bulkhead.max_concurrent ? bulkhead.in_flight / bulkhead.max_concurrent : 0;
    const queued = bulkhead.queued ? ` + ${bulkhead.queued} queued` : "";
    setText(parts.bulkText,
      `${bulkhead.in_flight} / ${bulkhead.max_concurrent} in flight${queued}`);
    parts.bulkFill.style.width = `${Math.min(100, used * 100)}%`;
    parts.bulkFill.classList.toggle("hot", used >= 0.8 || bulkhead.queued > 0);
  }

  function createMismatch() {
    const li = el("li");
    const details = el("details");
    details.append(el("summary"), el("pre"));
    li.append(details);
    return li;
  }

  function updateMismatch(li, m) {
    const [summary, pre] = li.firstChild.children;
    const [primary, shadow] = m.status;
    setText(summary, `${clock(m.time)} · ${m.method} ${m.target} · ` +
      `${primary} vs ${shadow} · id ${m.request_id}`);
    setText(pre, m.diff);
  }

  function renderShadow(parts, shadow) {
    parts.shadow.hidden = !shadow;
    if (!shadow) return;
    setText(parts.shadowTitle, `Shadow → ${shadow.backend}`);
    const compared = shadow.match + shadow.mismatch;
    const matchRate = compared ? `${percent(shadow.match / compared)} match` : "no comparisons yet";
    setText(parts.shadowRate, `${matchRate} (${shadow.match} of ${compared} compared) · ` +
      `${shadow.error} errors · ${shadow.dropped ?? 0} dropped`);
    parts.shadowRate.classList.toggle("bad", shadow.mismatch > 0);
    const recent = shadow.recent_mismatches.slice(0, SHOWN_MISMATCHES);
    sync(parts.mismatches, recent, (m) => `${m.request_id}@${m.time}`, createMismatch,
      updateMismatch);
  }

  function updateCard(card, route, legacy) {
    const parts = card.parts;
    const breakers = Object.values(route.backends).map((b) => b.breaker);
    card.classList.toggle("alarm", breakers.includes("open"));
    renderBadges(parts.badges, route);
    renderMatch(parts.match, route.match);
    renderSplit(parts, route, legacy);
    sync(parts.rows, Object.entries(route.backends), (e) => e[0], createRow, updateRow);
    renderBulkhead(parts, route.bulkhead);
    renderShadow(parts, route.shadow);
  }

  // ---------------------------------------------------------------- polling

  function showStatus(stale, text) {
    document.body.classList.toggle("stale", stale);
    $("status").className = stale ? "status stale" : "status";
    setText($("status"), text);
  }

  function render(data) {
    renderHeader(data);
    sync($("routes"), data.routes, (r) => r.name, createCard,
      (card, route) => updateCard(card, route, data.legacy));
  }

  async function poll() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const response = await fetch("api/routes", { cache: "no-store", signal: abort.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      lastOk = Date.now() / 1000;
      showStatus(false, `Updated ${clock(lastOk)} · every ${POLL_MS / 1000} s`);
    } catch (err) {
      const reason = err && err.name === "AbortError" ? "timed out" : String(err && err.message);
      const since = lastOk ? `showing data from ${clock(lastOk)}` : "no data yet";
      showStatus(true, `Stale: admin API unreachable (${reason}); ${since}`);
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
