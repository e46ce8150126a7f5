// A ticket in a real browser: enter a key, open the Tickets tab, check that the context
// package reads as sections (what failed, the error, steps done, suggestion), take a
// screenshot, click Skip, and wait until the card says it is resolved.
//
//   node ticket.mjs <base_url> <key> <ticket_id> <screenshot.png>
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, key, ticketId, shot] = process.argv.slice(2);
if (!base || !key || !ticketId || !shot) {
  console.error("usage: node ticket.mjs <base_url> <key> <ticket_id> <screenshot.png>");
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), "keel-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.KEEL_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
  context.setDefaultTimeout(20_000);
  const page = context.pages()[0] ?? (await context.newPage());
  await page.goto(new URL("/", base).href);
  await page.fill("#key", key);
  await page.locator('#key-form button[type="submit"]').click();
  await page.locator('[data-tab="tickets"]').click();
  const card = page.locator(`.ticket[data-ticket="${ticketId}"]`);
  await card.waitFor({ state: "visible" });
  for (const section of ["ctx-failed", "ctx-error", "ctx-suggestion"]) {
    const text = await card.locator(`section.${section}`).innerText();
    console.log(`${section}: ${text.replace(/\s+/g, " ").trim()}`);
  }
  await page.screenshot({ path: shot, fullPage: true });
  await card.locator('button[data-action="skip"]').click();
  await page.locator(`.ticket[data-ticket="${ticketId}"][data-status="resolved"]`).waitFor({ state: "visible" });
  console.log(`ticket ${ticketId} resolved`);
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
