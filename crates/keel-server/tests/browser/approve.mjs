// The web inbox in a real browser: enter an approver's key, find the pending approval,
// click Approve, and wait until the card says it is approved. Run by the Rust test
// crates/keel-server/tests/it/browser.rs, which starts the server and checks the run.
//
//   node approve.mjs <base_url> <approver_key> [approval_id]
//
// Drives Debian's chromium (KEEL_CHROMIUM, default /usr/bin/chromium) through
// playwright-core; no browser is downloaded. Exits non-zero, with the page's console
// and status line, when any step does not happen within its bound.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, key, approvalId] = process.argv.slice(2);
if (!base || !key) {
  console.error("usage: node approve.mjs <base_url> <approver_key> [approval_id]");
  process.exit(2);
}
const executablePath = process.env.KEEL_CHROMIUM || "/usr/bin/chromium";
const bound = 20_000;

const profile = mkdtempSync(join(tmpdir(), "keel-chromium-"));
const console_ = [];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  context.setDefaultTimeout(bound);
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => console_.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));

  await page.goto(new URL("/", base).href);
  await page.fill("#key", key);
  await page.locator('#key-form button[type="submit"]').click();

  const card = approvalId
    ? page.locator(`.approval[data-approval="${approvalId}"]`)
    : page.locator(".approval", { has: page.locator("button.approve") }).first();
  await card.locator("button.approve").waitFor({ state: "visible" });
  const id = await card.getAttribute("data-approval");
  console.log(`pending approval ${id} is in the inbox`);

  await card.locator("input.comment").fill("approved in the browser test");
  await card.locator("button.approve").click();

  const done = page.locator(`.approval[data-approval="${id}"][data-status="approved"]`);
  await done.waitFor({ state: "attached" });
  console.log(`approval ${id}: ${(await done.innerText()).split("\n").pop()}`);
} catch (e) {
  console.error(`browser test failed: ${e.message}`);
  for (const line of console_) console.error(line);
  try {
    const page = context?.pages()[0];
    if (page) console.error(`#status: ${await page.locator("#status").innerText({ timeout: 1000 })}`);
  } catch {
    // The page is gone; the error above says why.
  }
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
