// Browser test of the OptiRoute web UI in headless Chromium, driven by
// playwright-core. Run by e2e/tests/ui.rs against a live stack:
//
//   OPTIROUTE_UI_URL=http://127.0.0.1:8000 node e2e/ui/chat.test.mjs
//
// Answers stream in from POST /v1/chat/completions (SSE); the test checks
// the request, the streaming itself, the routing line from the last chunk,
// errors before and during the stream, and an SSE parser fed awkward splits.
//
// Optional: OPTIROUTE_UI_BROKEN_URL (a stack whose cloud upstream breaks
// after two streamed words: the mid-stream error is shown under the partial
// answer; skipped when unset), OPTIROUTE_UI_SCREENSHOTS (folder, default target/ui-screenshots),
// OPTIROUTE_UI_NODE_MODULES (where playwright-core is, default .tools/ui-test),
// CHROMIUM_BIN (default /usr/bin/chromium). Exits 0 on success; on failure it
// prints what went wrong and saves target/ui-screenshots/failure.png.
import { createRequire } from "node:module";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const base = (process.env.OPTIROUTE_UI_URL || "").replace(/\/+$/, "");
if (!base) {
  console.error("set OPTIROUTE_UI_URL to the ingress base URL, e.g. http://127.0.0.1:8000");
  process.exit(2);
}
const brokenBase = (process.env.OPTIROUTE_UI_BROKEN_URL || "").replace(/\/+$/, "");
const shots = process.env.OPTIROUTE_UI_SCREENSHOTS || join(root, "target", "ui-screenshots");
const modules = process.env.OPTIROUTE_UI_NODE_MODULES || join(root, ".tools", "ui-test");
const chromiumBin = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const { chromium } = createRequire(join(modules, "package.json"))("playwright-core");

const TIMEOUT = 15_000;
const started = Date.now();
const log = (msg) => console.log(`[ui ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);

function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "optiroute-ui-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumBin,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 1000 },
  deviceScaleFactor: 1,
  timeout: 30_000,
});
let page = context.pages()[0] || (await context.newPage());
const pageErrors = [];
const watch = (p) => {
  p.on("pageerror", (e) => pageErrors.push(String(e)));
  p.on("console", (m) => {
    // The oversized prompt below is refused with a 400 on purpose.
    if (m.type() === "error" && !/status of 400/.test(m.text())) pageErrors.push(`console: ${m.text()}`);
  });
};
watch(page);

// Answer cards whose stream has ended (or errors shown instead of one).
const CARDS = "#messages > li.msg.answer:not(.streaming), #messages > li.msg.error";

/** Types a prompt, sends it and waits until its answer has finished streaming; returns the card. */
async function ask(p, prompt, provider = "auto") {
  const before = await p.locator(CARDS).count();
  await p.getByLabel("Provider").selectOption(provider);
  await p.getByLabel("Prompt").fill(prompt);
  await p.getByRole("button", { name: "Send" }).click();
  const card = p.locator(CARDS).nth(before);
  await card.waitFor({ timeout: TIMEOUT });
  return card;
}

/** Records every text an answer bubble shows while it is still streaming. */
async function recordPartials(p) {
  await p.evaluate(() => {
    window.__partials = [];
    new MutationObserver(() => {
      for (const li of document.querySelectorAll("#messages > li.msg.answer.streaming")) {
        const b = li.querySelector(".bubble");
        if (b) window.__partials.push(b.textContent);
      }
    }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
  });
}

/**
 * Replaces the page's fetch of /v1/chat/completions with a stream of the
 * given bytes, cut at the given offsets, delivered a few ms apart.
 */
async function stubStream(p, text, cutAt) {
  const bytes = [...new TextEncoder().encode(text)];
  await p.evaluate(
    ({ bytes, cuts }) => {
      const all = new Uint8Array(bytes);
      const bounds = [0, ...cuts, all.length];
      window.__stubBodies = [];
      const real = (window.__realFetch = window.__realFetch || window.fetch.bind(window));
      window.fetch = async (url, init) => {
        if (!String(url).endsWith("/v1/chat/completions")) return real(url, init);
        window.__stubBodies.push(JSON.parse(init.body));
        let i = 0;
        const body = new ReadableStream({
          async pull(ctl) {
            if (i + 1 >= bounds.length) return ctl.close();
            await new Promise((r) => setTimeout(r, 3));
            ctl.enqueue(all.slice(bounds[i], bounds[i + 1]));
            i++;
          },
        });
        return new Response(body, { status: 200, headers: { "content-type": "text/event-stream", "x-request-id": "stub-1" } });
      };
    },
    { bytes, cuts: cutAt(bytes) },
  );
}

async function requestsShown(p) {
  return (await p.locator("#stat-requests").textContent()).trim();
}

let ok = false;
try {
  // The page and its labelled controls.
  const resp = await page.goto(`${base}/`, { waitUntil: "load", timeout: TIMEOUT });
  check(resp && resp.ok(), `GET / answered ${resp && resp.status()}`);
  check((await page.title()) === "OptiRoute", "page title");
  for (const label of ["Prompt", "Provider", "Max tokens"]) {
    check((await page.getByLabel(label).count()) === 1, `one control labelled ${label}`);
  }
  // The live panel loads once on its own.
  await page.waitForFunction(
    () => /^\d+$/.test(document.getElementById("stat-requests").textContent.trim()),
    null,
    { timeout: TIMEOUT },
  );
  const initial = Number(await requestsShown(page));
  log(`page loaded, panel shows ${initial} requests`);
  const apiCalls = [];
  page.on("request", (r) => {
    const path = new URL(r.url()).pathname;
    if (path === "/generate" || path.startsWith("/v1/")) apiCalls.push({ method: r.method(), path, body: r.postData() });
  });
  await recordPartials(page);

  // A simple prompt: answered, with its routing line.
  await page.getByLabel("Max tokens").fill("60");
  const first = await ask(page, "Hello! What is NATS, in one sentence?");
  check(await first.evaluate((e) => e.classList.contains("answer")), "first prompt got an answer");
  const route1 = (await first.locator("[data-testid=route] .line").textContent()).trim();
  check(/^Routed to (local|cloud)/.test(route1), `routing line: ${route1}`);
  check(/served by (local|cloud)/.test(route1), `provider in routing line: ${route1}`);
  const chips1 = await first.locator(".chip").allTextContents();
  check(chips1.some((c) => c.startsWith("$") || c.startsWith("<")), `cost chip in ${chips1}`);
  check(chips1.some((c) => / (ms|s)$/.test(c)), `latency chip in ${chips1}`);
  check(chips1.includes("fresh"), `first answer is fresh: ${chips1}`);
  check(chips1.some((c) => / tok$/.test(c)), `token chip in ${chips1}`);
  // It went out as a streaming chat completion...
  check(apiCalls.length === 1, `one API call per prompt: ${JSON.stringify(apiCalls)}`);
  const call = apiCalls[0];
  check(call.method === "POST" && call.path === "/v1/chat/completions", `endpoint: ${call.method} ${call.path}`);
  const sent = JSON.parse(call.body);
  check(sent.stream === true && sent.model === "auto" && sent.max_tokens === 60, `request body: ${call.body}`);
  check(
    sent.messages.length === 1 && sent.messages[0].role === "user" &&
      sent.messages[0].content === "Hello! What is NATS, in one sentence?",
    `messages: ${call.body}`,
  );
  // ...and came in piece by piece: the bubble showed a growing prefix.
  const text1 = await first.locator(".bubble").textContent();
  check(text1.length > 0, "first answer has text");
  const partials = await page.evaluate(() => window.__partials);
  const prefixes = new Set(partials.filter((t) => t.length > 0 && t.length < text1.length && text1.startsWith(t)));
  check(prefixes.size >= 2, `answer streamed in (partials seen: ${JSON.stringify([...prefixes])})`);
  check((await first.getAttribute("aria-busy")) === null, "finished answer is not aria-busy");
  log(`answer 1 streamed in ${prefixes.size + 1} steps: ${route1}`);

  // A hard one goes to the cloud pool; its reason is shown.
  const second = await ask(
    page,
    "Compare the trade-offs of optimistic and pessimistic concurrency control in a distributed database, step by step, and explain why each one fails under high contention.",
  );
  const route2 = (await second.locator("[data-testid=route] .line").textContent()).trim();
  check(/^Routed to cloud/.test(route2), `hard prompt routed to cloud: ${route2}`);
  const why2 = await second.locator("[data-testid=route] .why").count();
  check(why2 === 1, "route reason shown");
  log(`answer 2: ${route2}`);

  // The same simple prompt again: the cache answers it (its write is async).
  let cachedSeen = false;
  for (let i = 0; i < 10 && !cachedSeen; i++) {
    const again = await ask(page, "Hello! What is NATS, in one sentence?");
    cachedSeen = (await again.locator(".chip.cached").count()) === 1;
    if (!cachedSeen) await page.waitForTimeout(200);
  }
  check(cachedSeen, "a repeated prompt is answered from the cache");
  const answers = await page.locator("#messages > li.msg.answer").count();
  log(`cache hit seen after ${answers} answers`);
  check(apiCalls.every((c) => c.path === "/v1/chat/completions"), "the page only calls /v1/chat/completions");

  // A plain POST /generate from outside the page: the panel counts answers
  // relayed through both endpoints (on its own 3 s poll at the latest).
  const plain = await page.request.post(`${base}/generate`, {
    data: { prompt: "What is a queue group?", max_tokens: 20, provider: "local" },
  });
  check(plain.ok(), `POST /generate answered ${plain.status()}`);
  await page.waitForFunction(
    (want) => Number(document.getElementById("stat-requests").textContent.trim()) >= want,
    initial + answers + 1,
    { timeout: 8_000 },
  );
  const ratio = (await page.locator("#stat-hit-ratio").textContent()).trim();
  check(/^\d+%$/.test(ratio) && ratio !== "0%", `hit ratio shown: ${ratio}`);
  check((await page.locator("#stat-breaker").textContent()).trim() !== "–", "breaker state shown");
  const status1 = await page.locator("#stats-status").textContent();
  log(`panel: ${await requestsShown(page)} requests, hit ratio ${ratio}, ${status1}`);
  // And keeps polling without a prompt.
  await page.waitForFunction(
    (prev) => document.getElementById("stats-status").textContent !== prev,
    status1,
    { timeout: 5_000 },
  );

  await page.locator("#prompt").blur();
  await page.screenshot({ path: join(shots, "chat.png") });
  log(`screenshot ${join(shots, "chat.png")}`);

  // An error from the API is shown readably (prompt over the size limit).
  const bad = await ask(page, "x".repeat(40 * 1024));
  check(await bad.evaluate((e) => e.classList.contains("error")), "oversized prompt shows an error");
  const errText = (await bad.textContent()).trim();
  check(/^Error 4\d\d: /.test(errText), `error text: ${errText.slice(0, 120)}`);
  check(!errText.includes("{"), `error is not raw JSON: ${errText.slice(0, 120)}`);
  log(`error shown: ${errText.slice(0, 100)}`);

  // The SSE parser, fed events cut inside "data:", inside JSON, inside UTF-8
  // characters and between \r and \n, with a comment line; model text that
  // looks like HTML stays text.
  const stub = await context.newPage();
  watch(stub);
  await stub.goto(`${base}/`, { waitUntil: "load", timeout: TIMEOUT });
  const chunk = (delta, finish, extra) =>
    JSON.stringify({
      id: "chatcmpl-stub", object: "chat.completion.chunk", created: 0, model: "auto",
      choices: [{ index: 0, delta, finish_reason: finish || null, logprobs: null }], ...extra,
    });
  const info = {
    provider: "local", routed_to: "cloud", cached: false, cost: 0.00000123, latency: 0.42,
    model: "stub-model", route_reason: "score 1.30 ≥ 1.05: code", fallback_reason: "circuit_open",
  };
  const sse =
    `data: ${chunk({ role: "assistant", content: "Hé" })}\r\n\r\n` +
    ": keep-alive\n\n" +
    `data: ${chunk({ content: "llo <b>wörld</b> " })}\n\n` +
    `data:${chunk({ content: "🚀 done" })}\r\n\r\n` +
    `data: ${chunk({}, "stop", { optiroute: info })}\n\n` +
    `data: ${JSON.stringify({ id: "chatcmpl-stub", object: "chat.completion.chunk", created: 0, model: "auto", choices: [], usage: { prompt_tokens: 9, completion_tokens: 21, total_tokens: 30 } })}\n\n` +
    "data: [DONE]\n\n";
  await stubStream(stub, sse, (b) => {
    const cuts = [];
    for (let i = 1; i < b.length; i++) {
      const inChar = (b[i] & 0xc0) === 0x80; // a UTF-8 continuation byte
      if (inChar || b[i - 1] === 13 || i % 7 === 0) cuts.push(i);
    }
    return cuts;
  });
  await stub.getByLabel("Max tokens").fill("33");
  const stubbed = await ask(stub, "stubbed prompt", "cloud");
  const stubBody = (await stub.evaluate(() => window.__stubBodies))[0];
  check(stubBody.model === "cloud" && stubBody.max_tokens === 33 && stubBody.stream === true, `stub body ${JSON.stringify(stubBody)}`);
  const stubText = await stubbed.locator(".bubble").textContent();
  check(stubText === "Héllo <b>wörld</b> 🚀 done", `reassembled text: ${JSON.stringify(stubText)}`);
  check((await stubbed.locator(".bubble b").count()) === 0, "model text is never HTML");
  const stubLine = (await stubbed.locator("[data-testid=route] .line").textContent()).trim();
  check(
    stubLine === "Routed to cloud → served by local (fallback: cloud circuit breaker open)",
    `routing line from the optiroute object: ${stubLine}`,
  );
  check((await stubbed.locator("[data-testid=route] .why").textContent()).includes("score 1.30"), "route reason");
  const stubChips = await stubbed.locator(".chip").allTextContents();
  for (const want of ["local", "fresh", "fallback: circuit_open", "$0.0000012", "420 ms", "stub-model", "30 tok"]) {
    check(stubChips.includes(want), `chip ${want} in ${stubChips}`);
  }
  check((await stubbed.getAttribute("data-request-id")) === "stub-1", "request id from x-request-id");
  log(`stubbed stream reassembled: ${stubLine}`);

  // An error event after the stream started (no [DONE]): shown under the
  // partial answer, readably.
  await stubStream(
    stub,
    `data: ${chunk({ role: "assistant", content: "partial " })}\n\ndata: ${chunk({ content: "answer" })}\n\n` +
      `data: ${JSON.stringify({ error: { message: "the stream broke after its first token: boom", type: "stream_error", code: "stream_interrupted" } })}\n\n`,
    (b) => [10, 50, b.length - 20],
  );
  const cut = await ask(stub, "another stubbed prompt");
  check((await cut.locator(".bubble").first().textContent()) === "partial answer", "partial answer kept");
  const cutErr = (await cut.locator(".stream-error").textContent()).trim();
  check(/^Stream interrupted: the stream broke after its first token: boom/.test(cutErr), `stream error: ${cutErr}`);
  check(cutErr.includes("stream_interrupted") && !cutErr.includes("{"), `stream error is readable: ${cutErr}`);
  check((await cut.locator("[data-testid=route]").count()) === 0, "no routing line for a broken stream");
  await stub.close();

  // The same for real: a cloud upstream that breaks after two words.
  if (brokenBase) {
    const broken = await context.newPage();
    watch(broken);
    await broken.goto(`${brokenBase}/`, { waitUntil: "load", timeout: TIMEOUT });
    const card = await ask(broken, "Tell me a long story about message queues.", "cloud");
    const partial = (await card.locator(".bubble").first().textContent()).trim();
    check(partial.startsWith("cloud answer"), `partial cloud answer kept: ${partial}`);
    const err = (await card.locator(".stream-error").textContent()).trim();
    check(/^Stream interrupted: /.test(err) && err.includes("stream_interrupted"), `mid-stream error: ${err}`);
    check(!err.includes("{"), `mid-stream error is not raw JSON: ${err}`);
    check((await card.locator(".stream-error[role=alert]").count()) === 1, "the error is announced");
    await broken.screenshot({ path: join(shots, "chat-stream-error.png") });
    log(`mid-stream error shown: ${partial} / ${err.slice(0, 100)}`);
    await broken.close();
  } else {
    log("OPTIROUTE_UI_BROKEN_URL unset: real mid-stream error not checked");
  }

  // Phone-sized screen: one column, nothing wider than the viewport.
  const phone = await context.newPage();
  watch(phone);
  await phone.setViewportSize({ width: 390, height: 844 });
  await phone.goto(`${base}/`, { waitUntil: "load", timeout: TIMEOUT });
  await ask(phone, "Hi there, how are you?", "local");
  await phone.waitForFunction(
    () => /^\d+$/.test(document.getElementById("stat-requests").textContent.trim()),
    null,
    { timeout: TIMEOUT },
  );
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `no horizontal scroll on a phone (overflow ${overflow}px)`);
  await phone.locator("#prompt").blur();
  await phone.screenshot({ path: join(shots, "chat-phone.png"), fullPage: true });
  page = phone;

  check(pageErrors.length === 0, `no script errors: ${pageErrors.join("; ")}`);
  ok = true;
  log("ok");
} catch (e) {
  console.error(`[ui] FAILED: ${e && e.stack ? e.stack : e}`);
  try {
    await page.screenshot({ path: join(shots, "failure.png"), fullPage: true });
    console.error(`[ui] failure screenshot: ${join(shots, "failure.png")}`);
  } catch (_) {
    // The browser may be gone.
  }
  if (pageErrors.length) console.error(`[ui] page errors: ${pageErrors.join("; ")}`);
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(ok ? 0 : 1);
