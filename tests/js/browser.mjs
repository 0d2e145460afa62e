// Launches Debian's headless Chromium through playwright-core, trusting the gateway's dev
// certificate for wss by its SPKI hash (WebTransport trusts it by serverCertificateHashes).
import { chromium } from "playwright-core";
import { execSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/** A headless Chromium; `close()` also removes its profile. */
export async function launchChromium(spki) {
  const executablePath =
    process.env.CHROMIUM || execSync("command -v chromium").toString().trim();
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "gw-chromium-"));
  const browser = await chromium.launch({
    executablePath,
    ignoreDefaultArgs: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      `--user-data-dir=${profile}`, "--remote-debugging-pipe",
      `--ignore-certificate-errors-spki-list=${spki}`,
    ],
  });
  return {
    browser,
    async close() {
      await browser.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}
