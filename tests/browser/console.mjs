// Drives the orchestrator's web console in headless Chromium. Started by
// the console test (tests/tests/it/console.rs), which placed the orders and
// checks the databases afterwards; this script checks what a person sees.
//
// Environment: CONSOLE_URL (http://HOST:PORT/ui), CONSOLE_TOKEN (the
// operator token), COMPLETED, COMPENSATED, STUCK (saga ids; the stuck one
// is NEEDS_ATTENTION and will finish when retried), STUCK_PRODUCT (a
// product only the stuck order contains), SCREENSHOT_DIR,
// CHROMIUM (the browser; /usr/bin/chromium by default).
//
// Exits 0 when every check passed; otherwise prints what failed, 1.
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("CONSOLE_URL");
const token = env("CONSOLE_TOKEN");
const ids = { completed: env("COMPLETED"), compensated: env("COMPENSATED"), stuck: env("STUCK") };
const productStuck = env("STUCK_PRODUCT");
const screenshots = env("SCREENSHOT_DIR");
const TIMEOUT = 15000;

function check(condition, what) {
  if (!condition) throw new Error("check failed: " + what);
  console.log("ok  " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const pageErrors = [];
try {
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().includes("401")) pageErrors.push(message.text());
  });

  // This orchestrator has an operator token: the page asks for it.
  await page.goto(url);
  await page.waitForSelector("#token-form", { state: "visible" });
  check((await page.textContent("#token-why")).includes("token"), "the page asks for the token");
  await page.fill("#token-input", token);
  await page.fill("#operator-input", "tester");
  await page.click("#token-save");
  await page.waitForSelector("#token-form", { state: "hidden" });
  check(true, "the token form closes once the token is given");
  check(await page.evaluate(() => sessionStorage.getItem("saga-console-token")) === token,
    "the token is kept in the tab's sessionStorage");
  check(await page.evaluate(() => localStorage.length) === 0, "nothing is kept in localStorage");

  // The list: all three, with their statuses.
  const row = (id) => `#sagas tbody tr[data-saga-id="${id}"]`;
  for (const id of Object.values(ids)) await page.waitForSelector(row(id));
  const statusOf = (id) => page.getAttribute(row(id), "data-status");
  check(await statusOf(ids.completed) === "COMPLETED", "the completed saga is listed COMPLETED");
  check(await statusOf(ids.compensated) === "FAILED", "the compensated saga is listed FAILED");
  check(await statusOf(ids.stuck) === "NEEDS_ATTENTION", "the stuck saga is listed NEEDS_ATTENTION");

  // Filters: customer, product, status, each alone.
  const listed = async () => page.$$eval("#sagas tbody tr", (rows) => rows.map((r) => r.dataset.sagaId));
  const filter = async (status, customer, product, expected, what) => {
    await page.selectOption("#f-status", status);
    await page.fill("#f-customer", customer);
    await page.fill("#f-product", product);
    await page.click("#f-apply");
    await page.waitForFunction((want) => {
      const rows = [...document.querySelectorAll("#sagas tbody tr")].map((r) => r.dataset.sagaId);
      return rows.length === want.length && want.every((id) => rows.includes(id));
    }, expected);
    check(JSON.stringify((await listed()).sort()) === JSON.stringify([...expected].sort()), what);
  };
  const customer = await page.textContent(`${row(ids.compensated)} td.customer`);
  await filter("", customer, "", [ids.compensated], `the customer filter (${customer}) finds only that customer's saga`);
  await filter("", "", productStuck, [ids.stuck], `the product filter (${productStuck}) finds only the order with it`);
  await filter("COMPLETED", "", "", [ids.completed], "the status filter finds only the completed saga");
  await filter("", "", "", Object.values(ids), "with no filter every saga is back");

  // The stuck view: the stuck one, with why, and not the settled ones.
  await page.click("#nav-stuck");
  await page.waitForSelector(row(ids.stuck));
  const why = (await page.textContent(`${row(ids.stuck)} td.why`)).trim();
  check(why.length > 0, `the stuck view says why: "${why}"`);
  check((await listed()).every((id) => id !== ids.completed && id !== ids.compensated),
    "the stuck view lists no settled saga");

  // The compensated saga's timeline: reserve, the rejected charge, then
  // the compensations newest first (the refund, tombstone-safe, since the
  // charge was attempted; the release), as bars in that order on the axis.
  await page.click("#nav-sagas");
  await page.click(`${row(ids.compensated)} a`);
  await page.waitForFunction(() => document.querySelectorAll("#timeline .bar").length >= 4);
  const bars = await page.$$eval("#timeline .bar", (nodes) => nodes.map((n) => ({
    step: n.dataset.step, kind: n.dataset.kind, outcome: n.dataset.outcome, code: n.dataset.code,
    left: n.getBoundingClientRect().left, width: n.getBoundingClientRect().width,
  })));
  const shape = bars.map((b) => `${b.step}/${b.kind}/${b.outcome}`);
  check(JSON.stringify(shape) === JSON.stringify([
    "reserve_inventory/ACTION/SUCCEEDED",
    "charge_payment/ACTION/REJECTED",
    "charge_payment/COMPENSATION/SUCCEEDED",
    "reserve_inventory/COMPENSATION/SUCCEEDED",
  ]), "the timeline has reserve, the rejected charge, the refund, the release: " + shape.join(", "));
  check(bars[1].code === "FAILED_PRECONDITION", "the rejected charge shows its gRPC code");
  check(bars.every((b, i) => i === 0 || b.left >= bars[i - 1].left), "the bars are in time order on the axis");
  check(bars.every((b) => b.width > 0), "every bar has a width");
  check((await page.textContent("#saga-status")) === "FAILED", "the saga's status is shown");
  check((await page.textContent("#journal tbody")).includes("FAILED_PRECONDITION"),
    "the journal table shows the participant's answer");
  await page.screenshot({ path: `${screenshots}/console-timeline.png`, fullPage: true });

  // Retry the stuck one through the button; it finishes.
  await page.goto(url + "#/saga/" + encodeURIComponent(ids.stuck));
  await page.waitForFunction(() => document.querySelector("#saga-status").textContent === "NEEDS_ATTENTION");
  await page.click("#retry");
  await page.waitForFunction(() => document.querySelector("#saga-status").textContent === "FAILED");
  check(true, "after Retry the stuck saga finished its compensation (FAILED)");
  const note = await page.textContent("#timeline");
  check(note.includes("retry by operator tester (console)"), "the timeline shows the retry, with who");
  check((await page.$$("#timeline .marker")).length >= 1, "the retry is a marker on the timeline");
  check(await page.isDisabled("#retry"), "a finished saga offers no retry");
  await page.screenshot({ path: `${screenshots}/console-retried.png`, fullPage: true });

  await page.goto(url);
  await page.waitForSelector(row(ids.stuck));
  await page.waitForFunction((id) =>
    document.querySelector(`#sagas tbody tr[data-saga-id="${id}"]`)?.dataset.status === "FAILED", ids.stuck);
  await page.screenshot({ path: `${screenshots}/console-list.png`, fullPage: true });
  check(pageErrors.length === 0, "the page logged no errors" + (pageErrors.length ? ": " + pageErrors.join("; ") : ""));
} catch (error) {
  console.error(String(error && error.stack || error));
  if (pageErrors.length) console.error("page errors: " + pageErrors.join("; "));
  process.exitCode = 1;
} finally {
  await browser.close();
}
