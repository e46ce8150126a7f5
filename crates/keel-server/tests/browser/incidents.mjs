// The incidents tab in a real browser: enter a key, open Incidents, wait for an open
// and a resolved incident, take a screenshot, and print each incident card as
// `id<TAB>state<TAB>heading<TAB>summary<TAB>timeline line | timeline line…`, one per
// line. Run by crates/keel-server/tests/it/browser.rs, which checks them.
//
//   node incidents.mjs <base_url> <key> <screenshot.png>
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, key, shot] = process.argv.slice(2);
if (!base || !key || !shot) {
  console.error("usage: node incidents.mjs <base_url> <key> <screenshot.png>");
  process.exit(2);
}
const executablePath = process.env.KEEL_CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "keel-chromium-"));
const console_ = [];
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  context.setDefaultTimeout(20_000);
  const page = context.pages()[0] ?? (await context.newPage());
  await page.setViewportSize({ width: 1100, height: 800 });
  page.on("console", (m) => console_.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(new URL("/", base).href);
  await page.fill("#key", key);
  await page.locator('#key-form button[type="submit"]').click();
  await page.locator('button[data-tab="incidents"]').click();
  await page.locator('#incidents .incident[data-state="open"] .timeline li').first().waitFor({ state: "visible" });
  await page.locator('#incidents .incident[data-state="resolved"] .timeline li').first().waitFor({ state: "visible" });
  console.log(`badge\t${await page.locator("#count-incidents").innerText()}`);
  await page.screenshot({ path: shot, fullPage: true });
  for (const card of await page.locator("#incidents .incident").all()) {
    const id = await card.getAttribute("data-incident");
    const st = await card.getAttribute("data-state");
    const heading = await card.locator("h3").innerText();
    const summary = await card.locator("h3 + div").innerText();
    const lines = await card.locator(".timeline li").allInnerTexts();
    console.log([id, st, heading, summary, lines.join(" | ")].join("\t"));
  }
} catch (e) {
  console.error(`incidents test failed: ${e.message}`);
  for (const line of console_) console.error(line);
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
