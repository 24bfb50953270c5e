// OptiRoute chat page: streams answers from POST /v1/chat/completions
// (Server-Sent Events) and polls GET /stats.
// Plain browser JavaScript, no framework, no build step. Model output is only
// ever inserted as text (textContent), never as HTML.
"use strict";

(function () {
  const STATS_EVERY_MS = 3000;
  const MAX_TOKENS_LIMIT = 4096;

  const $ = (id) => document.getElementById(id);
  const form = $("chat-form");
  const promptEl = $("prompt");
  const providerEl = $("provider");
  const maxTokensEl = $("max-tokens");
  const sendBtn = $("send");
  const messages = $("messages");

  const FALLBACK_TEXT = {
    circuit_open: "cloud circuit breaker open",
    not_configured: "cloud pool not configured",
    timeout: "provider timed out",
    no_responders: "no provider worker available",
    upstream_error: "upstream failed",
    rate_limited: "upstream rate-limited",
    overloaded: "provider overloaded",
    nats_unavailable: "NATS unavailable",
  };

  // ---------- formatting ----------
  function usd(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    if (v <= 0) return "$0";
    if (v >= 1) return "$" + v.toFixed(2);
    if (v >= 0.01) return "$" + v.toFixed(4);
    if (v < 1e-10) return "< $0.0000000001";
    // Two significant digits, written out: $0.000000025 rather than 2.5e-8.
    const decimals = Math.min(10, Math.ceil(-Math.log10(v)) + 1);
    return "$" + v.toFixed(decimals).replace(/0+$/, "").replace(/\.$/, "");
  }
  function secs(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    if (v < 1) return Math.max(0, Math.round(v * 1000)) + " ms";
    return v.toFixed(2) + " s";
  }
  // "7 / 12 ms" when both share a unit, else "840 ms / 1.20 s".
  function pair(a, b) {
    if (typeof a === "number" && typeof b === "number" && a < 1 && b < 1) {
      return Math.round(a * 1000) + " / " + Math.round(b * 1000) + " ms";
    }
    if (typeof a === "number" && typeof b === "number" && a >= 1 && b >= 1) {
      return a.toFixed(2) + " / " + b.toFixed(2) + " s";
    }
    return secs(a) + " / " + secs(b);
  }
  function pct(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    return Math.round(v * 100) + "%";
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function chip(text, cls, title) {
    const c = el("span", "chip" + (cls ? " " + cls : ""), text);
    if (title) c.title = title;
    return c;
  }
  function scrollToEnd() {
    const last = messages.lastElementChild;
    if (last && last.scrollIntoView) last.scrollIntoView({ block: "end", behavior: "smooth" });
  }

  // ---------- chat ----------
  function addMessage(node) {
    const hint = $("empty-hint");
    if (hint) hint.remove();
    messages.appendChild(node);
    scrollToEnd();
    return node;
  }

  // The routing line and chips under an answer. `a` holds the `optiroute`
  // object of the stream's last chunk: provider, routed_to, cached, cost,
  // latency, model, route_reason, fallback_reason.
  function renderRoute(a, usage, finishReason) {
    const route = el("div", "route");
    route.setAttribute("data-testid", "route");
    const routed = a.routed_to || "?";
    const served = a.provider || "?";
    let line = "Routed to " + routed;
    line += served === routed ? " · served by " + served : " → served by " + served;
    if (a.fallback_reason) line += " (fallback: " + (FALLBACK_TEXT[a.fallback_reason] || a.fallback_reason) + ")";
    line += a.cached ? " · from cache" : "";
    route.appendChild(el("div", "line", line));
    if (a.route_reason) route.appendChild(el("div", "why", "Why: " + a.route_reason));

    const chips = el("div", "chips");
    chips.appendChild(chip(served, served, "Provider that served the answer"));
    chips.appendChild(a.cached ? chip("cached", "cached", "Answered from the cache") : chip("fresh", "", "Not from the cache"));
    if (a.fallback_reason) chips.appendChild(chip("fallback: " + a.fallback_reason, "fallback", "Why the other pool answered"));
    chips.appendChild(chip(usd(a.cost), "", "Cost in USD: " + a.cost));
    chips.appendChild(chip(secs(a.latency), "", "Latency at the router: " + a.latency + " s"));
    if (a.model) chips.appendChild(chip(a.model, "", "Model"));
    if (finishReason === "length") chips.appendChild(chip("max tokens reached", "fallback", "The answer was cut at the max tokens limit"));
    const tokens = el("span", "tokens");
    chips.appendChild(tokens);
    route.appendChild(chips);
    if (usage) showUsage(route, usage);
    return route;
  }

  function showUsage(route, usage) {
    const slot = route.querySelector(".tokens");
    if (!slot || typeof usage.total_tokens !== "number") return;
    slot.replaceWith(chip(usage.total_tokens + " tok", "",
      "prompt " + usage.prompt_tokens + " + completion " + usage.completion_tokens));
  }

  function errorBody(status, err, label) {
    const b = el("div", "bubble");
    b.appendChild(el("strong", "", (label || "Error") + (status ? " " + status : "") + ": "));
    b.appendChild(document.createTextNode(err.message || "request failed"));
    const code = [err.code, err.type].filter(Boolean).join(" · ");
    if (code) b.appendChild(el("div", "code", code));
    return b;
  }

  function renderError(li, status, err) {
    li.className = "msg error";
    li.removeAttribute("aria-busy");
    li.replaceChildren();
    li.setAttribute("role", "alert");
    li.appendChild(errorBody(status, err));
  }

  // ---------- streaming ----------
  // One answer being streamed into `li`: text is only ever set with
  // textContent, once per network read.
  function Answer(li) {
    this.li = li;
    this.text = "";
    this.bubble = null;
    this.route = null;
    this.finished = false; // the chunk with finish_reason arrived
    this.done = false; // data: [DONE]
    this.failed = false;
    this.requestId = null;
  }
  Answer.prototype.start = function () {
    if (this.bubble) return;
    const li = this.li;
    li.className = "msg answer streaming";
    li.setAttribute("aria-busy", "true");
    li.replaceChildren();
    this.bubble = el("div", "bubble");
    li.appendChild(this.bubble);
    if (this.requestId) li.setAttribute("data-request-id", this.requestId);
  };
  Answer.prototype.append = function (t) {
    this.start();
    this.text += t;
  };
  Answer.prototype.paint = function () {
    if (!this.bubble) return;
    const follow = followsEnd(this.li);
    this.bubble.textContent = this.text === "" && this.finished ? "(empty answer)" : this.text;
    if (follow) keepInView(this.li);
  };
  Answer.prototype.finish = function (info, finishReason, usage) {
    this.start();
    this.finished = true;
    this.route = renderRoute(info || {}, usage, finishReason);
    this.li.appendChild(this.route);
  };
  Answer.prototype.usage = function (usage) {
    if (this.route) showUsage(this.route, usage);
  };
  // An error event (or a broken connection) after the stream started: the
  // partial answer stays, the error goes under it.
  Answer.prototype.fail = function (err, label) {
    this.start();
    this.failed = true;
    this.li.classList.add("failed");
    const box = el("div", "stream-error");
    box.setAttribute("role", "alert");
    box.appendChild(errorBody(null, err, label));
    this.li.appendChild(box);
  };
  Answer.prototype.end = function () {
    this.paint();
    this.li.classList.remove("streaming");
    this.li.removeAttribute("aria-busy");
  };

  // Is the end of `li` on screen (so the view should follow the new text)?
  function followsEnd(li) {
    const r = li.getBoundingClientRect();
    const box = messages.getBoundingClientRect();
    return r.bottom <= Math.min(box.bottom, window.innerHeight) + 48;
  }
  function keepInView(li) {
    if (li.scrollIntoView) li.scrollIntoView({ block: "end" });
  }

  // Applies one SSE event's data to the answer.
  function onEvent(ans, data) {
    if (data === "[DONE]") {
      ans.done = true;
      return;
    }
    let ev;
    try { ev = JSON.parse(data); } catch (_) { return; }
    if (!ev || typeof ev !== "object") return;
    if (ev.error) {
      ans.paint();
      ans.fail(typeof ev.error === "object" ? ev.error : { message: String(ev.error) }, "Stream interrupted");
      return;
    }
    const choice = Array.isArray(ev.choices) ? ev.choices[0] : null;
    if (choice) {
      const delta = choice.delta || {};
      if (typeof delta.content === "string" && delta.content !== "") ans.append(delta.content);
      if (choice.finish_reason) {
        ans.paint();
        ans.finish(ev.optiroute, choice.finish_reason, ev.usage);
      }
    } else if (ev.usage) {
      ans.usage(ev.usage);
    }
  }

  // Reads a text/event-stream body: events are separated by a blank line and
  // may be split anywhere across network reads (even inside a UTF-8 char).
  async function readEvents(body, ans) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    const lines = (final) => {
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buf);
        if (!m) break;
        // A lone "\r" at the end may be the first half of "\r\n".
        if (!final && m[0] === "\r" && m.index === buf.length - 1) break;
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) onEvent(ans, data.join("\n"));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.charAt(5) === " " ? 6 : 5));
        } else if (line === "data") {
          data.push("");
        } // comments (":...") and event/id/retry fields are ignored
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        buf += decoder.decode();
        lines(true);
        if (buf.startsWith("data:")) data.push(buf.slice(buf.charAt(5) === " " ? 6 : 5));
        if (data.length) onEvent(ans, data.join("\n"));
        break;
      }
      buf += decoder.decode(value, { stream: true });
      lines(false);
      ans.paint();
      if (ans.failed) {
        reader.cancel().catch(() => {});
        break;
      }
    }
  }

  async function send() {
    const prompt = promptEl.value;
    if (!prompt.trim()) {
      promptEl.focus();
      return;
    }
    const maxTokens = Number(maxTokensEl.value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1 || maxTokens > MAX_TOKENS_LIMIT) {
      const li = addMessage(el("li", "msg error"));
      renderError(li, null, { message: "Max tokens must be a whole number from 1 to " + MAX_TOKENS_LIMIT + "." });
      maxTokensEl.focus();
      return;
    }
    addMessage(el("li", "msg user", prompt));
    const pending = addMessage(el("li", "msg pending"));
    pending.appendChild(el("div", "bubble", "Routing…"));
    sendBtn.disabled = true;
    promptEl.value = "";
    let ans = null;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: withKey({ "content-type": "application/json", accept: "text/event-stream" }),
        body: JSON.stringify({
          model: providerEl.value,
          messages: [{ role: "user", content: prompt }],
          max_tokens: maxTokens,
          stream: true,
          // Adds a last chunk with the token counts the answer chips show.
          stream_options: { include_usage: true },
        }),
      });
      const type = resp.headers.get("content-type") || "";
      if (resp.ok && resp.body && type.startsWith("text/event-stream")) {
        ans = new Answer(pending);
        ans.requestId = resp.headers.get("x-request-id");
        await readEvents(resp.body, ans);
        if (!ans.bubble) {
          renderError(pending, null, { message: "The answer stream ended before any text arrived." });
        } else if (!ans.finished && !ans.failed) {
          ans.fail({ message: "The answer stream ended before the answer was complete." }, "Stream interrupted");
        }
      } else {
        // An error before the stream started: a normal HTTP error with a JSON body.
        let body = null;
        const raw = await resp.text();
        try { body = JSON.parse(raw); } catch (_) { body = null; }
        if (body && body.error) {
          renderError(pending, resp.status, typeof body.error === "object" ? body.error : { message: String(body.error) });
        } else {
          renderError(pending, resp.status, { message: raw ? raw.slice(0, 300) : resp.statusText || "unexpected answer" });
        }
      }
    } catch (e) {
      const message = (e && e.message ? e.message : String(e));
      if (ans && ans.bubble) {
        ans.fail({ message: "Connection lost: " + message }, "Stream interrupted");
      } else {
        renderError(pending, null, { message: "Could not reach the ingress: " + message });
      }
    } finally {
      if (ans && ans.bubble) ans.end();
      sendBtn.disabled = false;
      promptEl.focus();
      scrollToEnd();
      refreshStats();
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!sendBtn.disabled) send();
  });
  promptEl.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      if (!sendBtn.disabled) send();
    }
  });

  // ---------- live panel ----------
  function set(id, text, title) {
    const e = $(id);
    if (!e) return;
    e.textContent = text;
    if (title !== undefined) e.title = title;
  }

  function showStats(s) {
    const req = s.requests || {};
    const route = req.by_route || {};
    const total = req.total || 0;
    set("stat-requests", String(total));
    set("stat-routes", "local " + (route.local || 0) + " · cloud " + (route.cloud || 0));

    const spend = s.spend_usd || {};
    const split = spend.by_provider || {};
    set("stat-spend", usd(spend.total), "USD " + spend.total);
    set("stat-spend-split", "local " + usd(split.local) + "\ncloud " + usd(split.cloud));

    const cache = s.cache || {};
    set("stat-saved", usd(cache.cost_saved_usd), "USD " + cache.cost_saved_usd);
    set("stat-cache", "hits " + (cache.hits || 0) + " · misses " + (cache.misses || 0));
    set("stat-hit-ratio", cache.hit_ratio === null || cache.hit_ratio === undefined ? "–" : pct(cache.hit_ratio));
    $("hit-meter").style.width = ((cache.hit_ratio || 0) * 100).toFixed(1) + "%";

    const lat = s.latency_s || {};
    set("stat-latency", lat.count ? pair(lat.p50, lat.p95) : "–");
    set("stat-latency-count", "p50 / p95 · " + (lat.count || 0) + " answers");

    const cloud = s.cloud_pool || {};
    const breaker = cloud.breaker || "unknown";
    const badge = $("stat-breaker");
    badge.textContent = breaker;
    badge.className = "badge " + breaker;
    set("stat-cloud-workers", "cloud workers " + (cloud.workers === undefined ? "–" : cloud.workers));

    const local = route.local || 0;
    const cl = route.cloud || 0;
    const n = local + cl;
    $("routebar-local").style.width = n ? (local / n * 100).toFixed(1) + "%" : "0";
    $("routebar-cloud").style.width = n ? (cl / n * 100).toFixed(1) + "%" : "0";
    $("routebar").setAttribute("aria-label", "Routes: local " + local + ", cloud " + cl);
    const fb = (req.fallbacks && req.fallbacks.total) || 0;
    set("stat-fallbacks", fb ? fb + " fallback" + (fb === 1 ? "" : "s") : "no fallbacks");

    const routers = s.routers || {};
    const localPool = s.local_pool || {};
    let foot = "routers " + (routers.workers || 0) + " (" + (routers.requests || 0) + " requests, " +
      (req.failed || 0) + " failed) · local workers " + (localPool.workers || 0);
    if (s.nats && s.nats.connected === false) foot += " · NATS disconnected";
    set("stat-workers", foot);

    const status = $("stats-status");
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.classList.remove("stale");
  }

  let inFlight = false;
  async function refreshStats() {
    if (inFlight) return;
    inFlight = true;
    try {
      const resp = await fetch("/stats", { headers: { accept: "application/json" }, cache: "no-store" });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      showStats(await resp.json());
    } catch (e) {
      const status = $("stats-status");
      status.textContent = "stats unavailable";
      status.classList.add("stale");
    } finally {
      inFlight = false;
    }
  }

  // ---------- spend ----------
  // The key typed in the spend panel, kept in memory only (never stored).
  // A user key is also sent with the chats; the admin key never is.
  let apiKey = "";
  let userKey = false;
  function withKey(headers) {
    if (userKey && apiKey) headers.authorization = "Bearer " + apiKey;
    return headers;
  }
  async function getJson(path) {
    const resp = await fetch(path, {
      headers: { accept: "application/json", authorization: "Bearer " + apiKey },
      cache: "no-store",
    });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    return { status: resp.status, body: body };
  }
  function tokens(r) {
    return (r.prompt_tokens || 0) + (r.completion_tokens || 0);
  }
  function spendTable(title, rows, label) {
    const t = el("table", "spend-table");
    t.appendChild(el("caption", null, title));
    const head = el("tr");
    ["", "requests", "tokens", "cost"].forEach((h) => head.appendChild(el("th", null, h)));
    t.appendChild(head);
    rows.forEach((r) => {
      const tr = el("tr");
      tr.appendChild(el("th", null, label(r)));
      tr.appendChild(el("td", null, r.requests));
      tr.appendChild(el("td", null, tokens(r)));
      tr.appendChild(el("td", null, usd(r.cost_usd)));
      t.appendChild(tr);
    });
    if (!rows.length) {
      const tr = el("tr");
      const td = el("td", null, "no spend yet");
      td.colSpan = 4;
      tr.appendChild(td);
      t.appendChild(tr);
    }
    return t;
  }
  function errText(r) {
    return (r.body && r.body.error && r.body.error.message) || "HTTP " + r.status;
  }
  async function showSpend() {
    const out = $("spend-out");
    const status = $("spend-status");
    out.replaceChildren();
    status.textContent = "loading…";
    const byTeam = await getJson("/admin/spend?group_by=team&period=month");
    if (byTeam.status === 200) {
      userKey = false;
      const s = byTeam.body;
      const n = s.total.requests;
      status.textContent = usd(s.total.cost_usd) + " in " + n + (n === 1 ? " request" : " requests") + " since " +
        s.start + " (resets " + s.resets_at + ")";
      out.appendChild(spendTable("By team", s.groups, (g) => g.team || "(no team)"));
      const byKey = await getJson("/admin/spend?group_by=key&period=month");
      if (byKey.status === 200) {
        out.appendChild(spendTable("By key", byKey.body.groups, (g) => g.name ? g.name + " (" + g.key_id + ")" : g.key_id));
      }
      return;
    }
    const mine = await getJson("/v1/usage");
    if (mine.status !== 200) {
      userKey = false;
      status.textContent = "Not the admin key (" + errText(byTeam) + "); as a user key: " + errText(mine);
      return;
    }
    userKey = true;
    const u = mine.body;
    const left = u.budget_usd == null ? "no budget" : usd(u.remaining_usd) + " left of " + usd(u.budget_usd);
    status.textContent = u.key.name + ": " + usd(u.cost_usd) + " this " + u.period + ", " + left +
      (u.resets_at ? ", resets " + u.resets_at : "") + ". Chats now use this key.";
    const pools = Object.keys(u.by_pool || {}).map((p) => Object.assign({ pool: p }, u.by_pool[p]));
    out.appendChild(spendTable("This " + u.period + " by pool", pools, (r) => r.pool));
    if (u.team && typeof u.team.requests === "number") {
      const t = u.team;
      const teamLeft = t.budget_usd == null ? "no budget" : usd(t.remaining_usd) + " left";
      out.appendChild(spendTable("Team " + t.name + " this " + t.period + " (" + teamLeft + ")", [t], () => "all keys"));
    }
  }
  $("spend-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = $("api-key").value.trim();
    if (!apiKey) {
      userKey = false;
      $("spend-status").textContent = "Enter a key first.";
      return;
    }
    showSpend().catch(() => {
      $("spend-status").textContent = "spend unavailable";
    });
  });

  refreshStats();
  setInterval(() => {
    if (!document.hidden) refreshStats();
  }, STATS_EVERY_MS);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshStats();
  });
})();
