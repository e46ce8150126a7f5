// The dashboard in a real browser: enter a key, open the Dashboard tab, and print the
// budget table's rows (`budget<TAB>tokens<TAB>cost<TAB>attempts<TAB>refused<TAB>state`),
// one per line, after a screenshot of the page. Run by
// crates/keel-server/tests/it/browser.rs, which checks the numbers against /api/budgets.
//
//   node dashboard.mjs <base_url> <key> <screenshot.png>
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, key, shot] = process.argv.slice(2);
if (!base || !key || !shot) {
  console.error("usage: node dashboard.mjs <base_url> <key> <screenshot.png>");
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
  page.on("console", (m) => console_.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));
  await page.goto(new URL("/", base).href);
  await page.fill("#key", key);
  await page.locator('#key-form button[type="submit"]').click();
  await page.locator('button[data-tab="dashboard"]').click();
  const rows = page.locator("#budgets tr[data-budget]");
  await rows.first().waitFor({ state: "visible" });
  await page.screenshot({ path: shot, fullPage: true });
  for (const row of await rows.all()) {
    const cells = await row.locator("td").allInnerTexts();
    console.log(cells.join("\t"));
  }
} catch (e) {
  console.error(`dashboard test failed: ${e.message}`);
  for (const line of console_) console.error(line);
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
