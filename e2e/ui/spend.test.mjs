// Browser test of the web UI's spend panel in headless Chromium, driven by
// playwright-core. Run by e2e/tests/ui.rs against an ingress with auth on:
//
//   OPTIROUTE_UI_URL=http://127.0.0.1:8000 OPTIROUTE_UI_ADMIN_KEY=... \
//   OPTIROUTE_UI_USER_KEY=sk-or-... OPTIROUTE_UI_EXPECT='{"team":"red","key":"alice","cost":"$0.0125"}' \
//   node e2e/ui/spend.test.mjs
//
// With the admin key the panel shows spend by team and by key; with a user
// key, that key's own usage, and chats are then sent with that key; a
// wrong key shows why it was refused. Exits 0 on success.
import { createRequire } from "node:module";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const base = (process.env.OPTIROUTE_UI_URL || "").replace(/\/+$/, "");
const adminKey = process.env.OPTIROUTE_UI_ADMIN_KEY || "";
const userKey = process.env.OPTIROUTE_UI_USER_KEY || "";
const expect = JSON.parse(process.env.OPTIROUTE_UI_EXPECT || "{}");
if (!base || !adminKey || !userKey || !expect.team) {
  console.error("set OPTIROUTE_UI_URL, OPTIROUTE_UI_ADMIN_KEY, OPTIROUTE_UI_USER_KEY and OPTIROUTE_UI_EXPECT");
  process.exit(2);
}
const shots = process.env.OPTIROUTE_UI_SCREENSHOTS || join(root, "target", "ui-screenshots");
const modules = process.env.OPTIROUTE_UI_NODE_MODULES || join(root, ".tools", "ui-test");
const chromiumBin = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const { chromium } = createRequire(join(modules, "package.json"))("playwright-core");

const TIMEOUT = 15_000;
function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "optiroute-ui-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumBin,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1280, height: 1100 },
  timeout: 30_000,
});
const page = context.pages()[0] || (await context.newPage());
const pageErrors = [];
page.on("pageerror", (e) => pageErrors.push(String(e)));
const chatAuth = [];
page.on("request", (r) => {
  if (r.url().endsWith("/v1/chat/completions")) chatAuth.push(r.headers()["authorization"] || null);
});

async function show(key) {
  await page.getByLabel("API key: the admin key, or your own").fill(key);
  await page.getByRole("button", { name: "Show" }).click();
  await page.waitForFunction(
    () => !/^loading/.test(document.getElementById("spend-status").textContent),
    null,
    { timeout: TIMEOUT },
  );
  return (await page.locator("#spend-status").textContent()).trim();
}

async function tableText(caption) {
  const t = page.locator("#spend-out table", { has: page.locator("caption", { hasText: caption }) });
  await t.waitFor({ timeout: TIMEOUT });
  return (await t.textContent()).replace(/\s+/g, " ");
}

async function chat() {
  const before = chatAuth.length;
  await page.getByLabel("Prompt").fill("hello");
  await page.getByRole("button", { name: "Send" }).click();
  const deadline = Date.now() + TIMEOUT;
  while (chatAuth.length === before) {
    check(Date.now() < deadline, "the chat request was sent");
    await new Promise((r) => setTimeout(r, 20));
  }
  // Let the answer (here an error: no router) finish before the next step.
  await page.locator("#messages > li.msg.error, #messages > li.msg.answer:not(.streaming)").last().waitFor({ timeout: TIMEOUT });
  return chatAuth[chatAuth.length - 1];
}

let ok = false;
try {
  const resp = await page.goto(`${base}/`, { waitUntil: "load", timeout: TIMEOUT });
  check(resp && resp.ok(), `GET / answered ${resp && resp.status()}`);

  // The admin key: spend by team and by key, this month.
  const adminStatus = await show(adminKey);
  check(adminStatus.includes(expect.cost), `admin total ${expect.cost}: ${adminStatus}`);
  const byTeam = await tableText("By team");
  check(byTeam.includes(expect.team) && byTeam.includes(expect.cost), `team row: ${byTeam}`);
  const byKey = await tableText("By key");
  check(byKey.includes(expect.key) && byKey.includes(expect.cost), `key row: ${byKey}`);
  check((await chat()) === null, "the admin key is never sent with chats");
  await page.screenshot({ path: join(shots, "spend-admin.png"), fullPage: true });

  // A user key: its own usage; chats now carry it.
  const userStatus = await show(userKey);
  check(userStatus.startsWith(expect.key) && userStatus.includes(expect.cost), `user status: ${userStatus}`);
  check(userStatus.includes("left of"), `the budget left: ${userStatus}`);
  const pools = await tableText("by pool");
  check(pools.includes("cloud") && pools.includes(expect.cost), `by pool: ${pools}`);
  await tableText(`Team ${expect.team}`);
  check((await chat()) === `Bearer ${userKey}`, "chats carry the user key");
  await page.screenshot({ path: join(shots, "spend-user.png"), fullPage: true });

  // A wrong key: refused, and chats go without a key again.
  const wrong = await show("sk-or-wrong");
  check(/unknown API key/.test(wrong), `wrong key: ${wrong}`);
  check((await page.locator("#spend-out table").count()) === 0, "no tables for a wrong key");
  check((await chat()) === null, "a refused key is not sent with chats");

  check(pageErrors.length === 0, `no script errors: ${pageErrors.join("; ")}`);
  ok = true;
  console.log("[spend ui] ok");
} catch (e) {
  console.error(`[spend ui] FAILED: ${e && e.stack ? e.stack : e}`);
  await page.screenshot({ path: join(shots, "spend-failure.png"), fullPage: true }).catch(() => {});
  if (pageErrors.length) console.error(`[spend ui] page errors: ${pageErrors.join("; ")}`);
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(ok ? 0 : 1);
