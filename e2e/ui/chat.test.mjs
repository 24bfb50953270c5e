// Browser test of the OptiRoute web UI in headless Chromium, driven by
// playwright-core. Run by e2e/tests/ui.rs against a live stack:
//
//   OPTIROUTE_UI_URL=http://127.0.0.1:8000 node e2e/ui/chat.test.mjs
//
// Optional: OPTIROUTE_UI_SCREENSHOTS (folder, default target/ui-screenshots),
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

/** Types a prompt, sends it and waits for its answer card; returns the card. */
async function ask(p, prompt, provider = "auto") {
  const before = await p.locator("#messages > li.msg.answer, #messages > li.msg.error").count();
  await p.getByLabel("Provider").selectOption(provider);
  await p.getByLabel("Prompt").fill(prompt);
  await p.getByRole("button", { name: "Send" }).click();
  const card = p.locator("#messages > li.msg.answer, #messages > li.msg.error").nth(before);
  await card.waitFor({ timeout: TIMEOUT });
  return card;
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
  log(`answer 1: ${route1}`);

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

  // The live panel catches up (on its own 3 s poll at the latest).
  await page.waitForFunction(
    (want) => Number(document.getElementById("stat-requests").textContent.trim()) >= want,
    initial + answers,
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
