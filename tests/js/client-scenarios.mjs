// The browser client (`/client.js`, served by the gateway) in headless Chromium, one
// scenario per run. Usage:
//   node client-scenarios.mjs SCENARIO '{"port":..,"certHash":"..","spki":"..",...}'
// Prints one JSON line with what the pages observed; the Rust tests assert on it.
import { spawn, spawnSync } from "node:child_process";
import dgram from "node:dgram";
import fs from "node:fs";
import https from "node:https";
import path from "node:path";
import readline from "node:readline";
import { launchChromium } from "./browser.mjs";

const [scenario, argJson] = process.argv.slice(2);
const args = JSON.parse(argJson);
let origin = `https://127.0.0.1:${args.port}`;
let chromium = null;

/** Chromium, launched once the gateway's certificate is known. */
async function browser() {
  chromium ??= await launchChromium(args.spki);
  return chromium.browser;
}

/**
 * Starts the gateway binary with `config` in `cwd`; resolves once it listens, with its
 * process and certificate hashes (a restart in the same `cwd` reuses the certificate).
 */
function startGateway(config, cwd) {
  const child = spawn(args.binary, ["--config", config], {
    cwd,
    env: { ...process.env, GATEWAY_LOG: "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((resolve) => child.on("exit", resolve));
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      const m = line.match(/^dev certificate \S+ sha256=(\S+) spki-sha256=(\S+)/);
      if (m) resolve({ child, exited, certHash: m[1], spki: m[2] });
    });
    child.on("exit", (code) => reject(new Error(`gateway exited (${code}) before listening`)));
  });
}

/** `POST /api/publish` with the API key `k`. */
function apiPublish(port, room, data) {
  return new Promise((resolve, reject) => {
    const body = JSON.stringify({ room, data });
    const req = https.request(
      {
        host: "127.0.0.1", port, path: "/api/publish", method: "POST", rejectUnauthorized: false,
        headers: { authorization: "Bearer k", "content-type": "application/json", "content-length": body.length },
      },
      (res) => {
        let text = "";
        res.on("data", (d) => (text += d));
        res.on("end", () => (res.statusCode === 200 ? resolve(JSON.parse(text)) : reject(new Error(`${res.statusCode} ${text}`))));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

/** A page on the gateway's origin (so `/client.js` is same-origin). */
async function newPage() {
  const page = await (await browser()).newPage();
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  page.on("console", (m) => console.error(`console: ${m.text()}`));
  await page.goto(`${origin}/healthz`);
  return page;
}

/** Creates `window.t.client` with `options`; records every event and room message. */
async function openClient(page, options = {}, url = `${origin}/chat`) {
  await page.evaluate(
    async ({ url, options, certHash }) => {
      const { connect } = await import("/client.js");
      const value = Uint8Array.from(certHash.match(/../g).map((h) => parseInt(h, 16)));
      const plain = (d) => (d instanceof Uint8Array ? { binary: [...d] } : d);
      const t = (window.t = { events: [], messages: [], tickets: 0, start: performance.now() });
      if (options.ticketsFor) {
        // Fresh one-time tickets from the gateway's own API, with the user's JWT.
        const jwt = options.ticketsFor;
        delete options.ticketsFor;
        options.getTicket = async () => {
          t.tickets++;
          const r = await fetch("/api/tickets", { method: "POST", headers: { authorization: `Bearer ${jwt}` } });
          return (await r.json()).ticket;
        };
      }
      t.client = connect(url, {
        serverCertificateHashes: [{ algorithm: "sha-256", value }],
        ...options,
      });
      for (const event of ["open", "transport", "reconnecting", "close", "resync", "direct", "presence"]) {
        t.client.on(event, (d) =>
          t.events.push({ event, at: Math.round(performance.now() - t.start), ...d, data: plain(d.data) }));
      }
      t.handler = (m) => t.messages.push({ ...m, data: plain(m.data) });
    },
    { url, options, certHash: args.certHash },
  );
}

/** Waits until `predicate` holds in `page`; a timeout names the condition and the page's state. */
async function until(page, predicate, arg, timeout = 30000) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 20 });
  } catch (e) {
    const seen = await page
      .evaluate(() => JSON.stringify({ events: window.t?.events, messages: window.t?.messages?.length }))
      .catch(() => "?");
    throw new Error(`waiting for ${predicate} failed: ${e.message}; page state ${seen}`);
  }
}
const opened = (page, n = 1) =>
  until(page, (n) => window.t.events.filter((e) => e.event === "open").length >= n, n);
const state = (page) =>
  page.evaluate(() => ({
    transport: window.t.client.transport,
    events: window.t.events,
    messages: window.t.messages,
    stats: window.t.client.stats,
  }));
const join = (page, room) => page.evaluate((room) => window.t.client.join(room, window.t.handler), room);

/** A UDP relay to the gateway's QUIC port that drops everything until `forward()`. */
function udpRelay(target) {
  const front = dgram.createSocket("udp4");
  const upstreams = new Map();
  let forwarding = false;
  front.on("message", (msg, from) => {
    if (!forwarding) return;
    const key = `${from.address}:${from.port}`;
    let up = upstreams.get(key);
    if (!up) {
      up = dgram.createSocket("udp4");
      up.on("message", (reply) => front.send(reply, from.port, from.address));
      up.bind(0, "127.0.0.1");
      upstreams.set(key, up);
    }
    up.send(msg, target, "127.0.0.1");
  });
  return new Promise((resolve) =>
    front.bind(0, "127.0.0.1", () =>
      resolve({
        port: front.address().port,
        forward() {
          forwarding = true;
        },
        close() {
          front.close();
          for (const up of upstreams.values()) up.close();
        },
      })));
}

const scenarios = {
  /** A WebTransport page and a WebSocket-only page chat in one room, JSON and binary. */
  async mixed() {
    const wt = await newPage();
    const ws = await newPage();
    await openClient(wt);
    await openClient(ws, { transports: ["websocket"] });
    await Promise.all([opened(wt), opened(ws)]);
    await join(wt, "mixed");
    await join(ws, "mixed");
    const publish = (page, data, binary) =>
      page.evaluate(
        ({ data, binary }) =>
          window.t.client.publish("mixed", binary ? new Uint8Array(data) : data),
        { data, binary },
      );
    const acks = [
      await publish(wt, { text: "from webtransport" }, false),
      await publish(wt, [1, 2, 3, 255], true),
      await publish(ws, { text: "from websocket" }, false),
      await publish(ws, [4, 5, 0], true),
    ];
    await until(wt, () => window.t.messages.length >= 2);
    await until(ws, () => window.t.messages.length >= 2);
    return { acks, wt: await state(wt), ws: await state(ws) };
  },

  /** The default client where WebTransport cannot connect (`args.udpPort` as given). */
  async fallback() {
    const page = await newPage();
    const holder = args.holdUdp ? dgram.createSocket("udp4") : null;
    let urls;
    if (holder) {
      await new Promise((r) => holder.bind(0, "127.0.0.1", r));
      urls = { webtransport: `https://127.0.0.1:${holder.address().port}/chat` };
    }
    await openClient(page, { webtransportTimeoutMs: 3000, ...(urls ? { urls } : {}) });
    await opened(page);
    await join(page, "fallback");
    const ack = await page.evaluate(() => window.t.client.publish("fallback", "still works", { echo: true }));
    await until(page, () => window.t.messages.length >= 1);
    holder?.close();
    return { ack, ...(await state(page)) };
  },

  /** Fell back behind a dropping relay; moves up to WebTransport once it forwards. */
  async reprobe() {
    const relay = await udpRelay(args.port);
    const page = await newPage();
    const publisher = await newPage();
    await openClient(publisher, { transports: ["websocket"] });
    await openClient(page, {
      urls: { webtransport: `https://127.0.0.1:${relay.port}/chat` },
      webtransportTimeoutMs: 1000,
      reprobeMs: 1000,
    });
    await Promise.all([opened(page), opened(publisher)]);
    await join(page, "reprobe");
    // A steady stream of messages across the switch.
    await publisher.evaluate(() => {
      let n = 0;
      window.t.pump = setInterval(() => window.t.client.publish("reprobe", n++).catch(() => {}), 20);
    });
    await until(page, () => window.t.messages.length >= 20);
    relay.forward();
    await until(page, () => window.t.client.transport === "webtransport", undefined, 30000);
    const switchedAt = await page.evaluate(() => window.t.messages.length);
    await until(page, (n) => window.t.messages.length >= n + 40, switchedAt);
    await publisher.evaluate(() => clearInterval(window.t.pump));
    await new Promise((r) => setTimeout(r, 300));
    const result = await state(page);
    relay.close();
    return { switchedAt, ...result };
  },

  /** Volatile publishes between two WebTransport pages travel as datagrams. */
  async volatile() {
    const from = await newPage();
    const to = await newPage();
    await openClient(from, { transports: ["webtransport"] });
    await openClient(to, { transports: ["webtransport"] });
    await Promise.all([opened(from), opened(to)]);
    await join(to, "volatile");
    const acks = [];
    for (let i = 0; i < 20; i++) {
      acks.push(await from.evaluate((i) => window.t.client.publish("volatile", { i }, { volatile: true }), i));
    }
    await until(to, () => window.t.messages.length >= 10);
    return { acks, from: await state(from), to: await state(to) };
  },

  /**
   * The gateway process restarts under an open page (`args.mode`): `single` (SIGKILL; the
   * new process has a new epoch), `cluster` (SIGKILL; node B publishes meanwhile and Redis
   * keeps the history), `sigterm` (a `reconnect` frame, then the new process).
   */
  async restart() {
    let a = await startGateway(args.configA, args.cwdA);
    Object.assign(args, { certHash: a.certHash, spki: a.spki });
    const b = args.configB ? await startGateway(args.configB, args.cwdB) : null;
    try {
      const page = await newPage();
      await openClient(page, { reconnect: { minDelayMs: 100, maxDelayMs: 1000 } });
      await opened(page);
      await join(page, "restart");
      for (let i = 1; i <= 3; i++) await apiPublish(args.port, "restart", `before ${i}`);
      await until(page, () => window.t.messages.length >= 3);
      const firstNode = (await state(page)).events.find((e) => e.event === "open").node;
      a.child.kill(args.mode === "sigterm" ? "SIGTERM" : "SIGKILL");
      await a.exited;
      await until(page, () => window.t.events.some((e) => e.event === "close"));
      // A request issued while disconnected waits and goes out on the next session.
      await page.evaluate(() => {
        window.t.queued = window.t.client
          .publish("restart", "queued", { echo: true })
          .then((ack) => (window.t.queuedAck = ack), (e) => (window.t.queuedAck = e));
      });
      if (b) for (let i = 1; i <= 3; i++) await apiPublish(args.portB, "restart", `during ${i}`);
      a = await startGateway(args.configA, args.cwdA);
      await opened(page, 2);
      await until(page, () => window.t.queuedAck !== undefined);
      // The rooms were joined again: recovered in the cluster, a new epoch on one node.
      const expected = b ? 7 : 4;
      await until(page, (n) => window.t.messages.length >= n, expected);
      for (let i = 1; i <= 2; i++) await apiPublish(args.port, "restart", `after ${i}`);
      await until(page, (n) => window.t.messages.length >= n, expected + 2);
      const queuedAck = await page.evaluate(() => window.t.queuedAck);
      return { firstNode, queuedAck, ...(await state(page)) };
    } finally {
      a.child.kill("SIGKILL");
      b?.child.kill("SIGKILL");
    }
  },

  /**
   * The room loses continuity under an open page: Redis forgets everything (FLUSHALL) and
   * the node's subscription drops (CLIENT KILL), so the room restarts in a new epoch. The
   * page gets `resync` (continuity) on the session it has, stays in the room, and takes
   * the new epoch's messages.
   */
  async continuity() {
    const a = await startGateway(args.configA, args.cwdA);
    Object.assign(args, { certHash: a.certHash, spki: a.spki });
    try {
      const page = await newPage();
      await openClient(page);
      await opened(page);
      const joined = await join(page, "cont");
      for (let i = 1; i <= 3; i++) await apiPublish(args.port, "cont", `before ${i}`);
      await until(page, () => window.t.messages.length >= 3);
      const redis = (...cmd) => spawnSync("redis-cli", ["-p", String(args.redisPort), ...cmd]).stdout.toString();
      redis("FLUSHALL");
      redis("CLIENT", "KILL", "TYPE", "pubsub");
      await until(page, () => window.t.events.some((e) => e.event === "resync"));
      await apiPublish(args.port, "cont", "after");
      await until(page, () => window.t.messages.length >= 4);
      return { joined, ...(await state(page)) };
    } finally {
      a.child.kill("SIGKILL");
    }
  },

  /**
   * The gateway process stops answering (SIGSTOP) under a WebSocket page: the client's own
   * liveness (two heartbeats without a frame or a `pong`) ends the session, and it
   * reconnects once the process runs again (SIGCONT).
   */
  async stall() {
    const a = await startGateway(args.configA, args.cwdA);
    Object.assign(args, { certHash: a.certHash, spki: a.spki });
    try {
      const page = await newPage();
      await openClient(page, { transports: ["websocket"], reconnect: { minDelayMs: 100, maxDelayMs: 500 } });
      await opened(page);
      await join(page, "stall");
      await new Promise((r) => setTimeout(r, 1500));
      const stoppedAt = await page.evaluate(() => Math.round(performance.now() - window.t.start));
      a.child.kill("SIGSTOP");
      await until(page, () => window.t.events.some((e) => e.event === "close"));
      a.child.kill("SIGCONT");
      await opened(page, 2);
      const ack = await page.evaluate(() => window.t.client.publish("stall", "after", { echo: true }));
      return { stoppedAt, ack, ...(await state(page)) };
    } finally {
      a.child.kill("SIGCONT");
      a.child.kill("SIGKILL");
    }
  },

  /**
   * Both users' sessions are closed with 4001 through `/api/disconnect`: the page with a
   * fixed token stays closed, the page with `getTicket` reconnects with a fresh ticket.
   */
  async reauth() {
    const fixed = await newPage();
    const renewing = await newPage();
    await openClient(fixed, { token: args.tokenFixed });
    await openClient(renewing, { ticketsFor: args.tokenRenewing, reconnect: { minDelayMs: 100, maxDelayMs: 500 } });
    await Promise.all([opened(fixed), opened(renewing)]);
    for (const user of ["tina", "gus"]) {
      await fixed.evaluate(async (user) => {
        const r = await fetch("/api/disconnect", {
          method: "POST",
          headers: { authorization: "Bearer k", "content-type": "application/json" },
          body: JSON.stringify({ user, code: 4001, reason: "token revoked" }),
        });
        if (!r.ok) throw new Error(`disconnect ${r.status}`);
      }, user);
    }
    await opened(renewing, 2);
    await until(fixed, () => window.t.events.some((e) => e.event === "close"));
    // A request on a client that stays closed settles at once.
    const refused = await fixed.evaluate(() => window.t.client.publish("r", 1).catch((e) => e));
    await new Promise((r) => setTimeout(r, 1000));
    const tickets = await renewing.evaluate(() => window.t.tickets);
    return { fixed: await state(fixed), renewing: await state(renewing), refused, tickets };
  },

  /**
   * An endpoint with `auth = "upstream"` in front of examples/backend/backend.py: a
   * WebSocket page admitted by its `session` cookie (alice) and a WebTransport page by the
   * `session` query parameter (bob; browsers send no cookies with WebTransport), each
   * with `welcome.data` on `open`, rpc answers, refusals, gateway errors, a client-side
   * timeout, the ninth overlapping call, publishes rewritten and refused by the backend,
   * and an rpc in flight when the session is closed (`connection_lost`, not sent again).
   */
  async upstream() {
    const pages = {};
    for (const [user, transport] of [["alice", "websocket"], ["bob", "webtransport"]]) {
      const page = await newPage();
      if (transport === "websocket") {
        await page.evaluate((user) => (document.cookie = `session=${user}; path=/; SameSite=Strict`), user);
        await openClient(page, { transports: ["websocket"] });
      } else {
        await openClient(page, { transports: ["webtransport"] }, `${origin}/chat?session=${user}`);
      }
      pages[user] = page;
    }
    await Promise.all(Object.values(pages).map((page) => opened(page)));
    // Each call's outcome, as plain data: `{ ok }` or the error's class, code and message.
    const calls = (page, list) =>
      page.evaluate(async (list) => {
        const outcome = (p) => {
          const start = performance.now();
          return p.then(
            (ok) => ({ ok, ms: Math.round(performance.now() - start) }),
            (e) => ({
              error: { isError: e instanceof Error, name: e.name, type: e.type, code: e.code, message: e.message },
              ms: Math.round(performance.now() - start),
            }),
          );
        };
        return Promise.all(list.map(([method, data, options]) => outcome(window.t.client.rpc(method, data, options))));
      }, list);
    const result = {};
    for (const [user, page] of Object.entries(pages)) {
      const r = (result[user] = {});
      // Nine overlapping calls: the server runs eight per session.
      r.nine = await calls(page, Array.from({ length: 9 }, () => ["sleep", { ms: 800 }]));
      [r.time, r.echo, r.whoami, r.unknown, r.empty, r.long] = await calls(page, [
        ["time"], ["echo", { a: [1, "two", null] }], ["whoami"], ["nope", 1], [""], ["x".repeat(129)],
      ]);
      // The backend answers after the gateway's timeout_ms (2 s): unavailable. The client's
      // own timeout (300 ms) comes first for the next one, whose late answer is ignored.
      [r.unavailable, r.timeout] = await calls(page, [["sleep", { ms: 2600 }], ["sleep", { ms: 1200 }, { timeoutMs: 300 }]]);
      [r.afterTimeout] = await calls(page, [["echo", "after"]]);
      r.joined = await page.evaluate(() => window.t.client.join("talk", window.t.handler));
      r.privateJoin = await page.evaluate(() => window.t.client.join("private.x").catch((e) => e));
      // Neither page joined `lobby`: the backend's connect answer did.
      r.lobby = await page.evaluate(() => window.t.client.presence("lobby"));
    }
    const publish = (page, data) =>
      page.evaluate((data) => window.t.client.publish("talk", data).catch((e) => e), data);
    result.alice.published = await publish(pages.alice, { text: "  hello    bob  ", name: "mallory" });
    result.bob.published = await publish(pages.bob, { text: "cheap SPAM here" });
    result.bob.published2 = await publish(pages.bob, { text: "hi alice" });
    await until(pages.bob, () => window.t.messages.length >= 1);
    await until(pages.alice, () => window.t.messages.length >= 1);
    // What each page received before its reconnection below (after which the rejoin with
    // `since` recovers the page's own publishes too: `echo` was false).
    await new Promise((r) => setTimeout(r, 300));
    for (const [user, page] of Object.entries(pages)) {
      result[user].delivered = await page.evaluate(() => window.t.messages.slice());
    }
    // A call in flight when the server closes the session (1011: the client reconnects).
    for (const [user, page] of Object.entries(pages)) {
      await page.evaluate(() => {
        window.t.lost = window.t.client.rpc("sleep", { ms: 1500, tag: "lost" }).then(
          (ok) => ({ ok }),
          (e) => ({ error: { isError: e instanceof Error, code: e.code, message: e.message } }),
        );
      });
      await new Promise((r) => setTimeout(r, 200));
      await page.evaluate(async (user) => {
        const r = await fetch("/api/disconnect", {
          method: "POST",
          headers: { authorization: "Bearer dev-api-key", "content-type": "application/json" },
          body: JSON.stringify({ user, code: 1011, reason: "test" }),
        });
        if (!r.ok) throw new Error(`disconnect ${r.status}`);
      }, user);
      result[user].lost = await page.evaluate(() => window.t.lost);
      await opened(page, 2);
      result[user].afterReconnect = (await calls(page, [["whoami"]]))[0];
    }
    // Longer than the lost call's sleep: a resent call would have reached the backend.
    await new Promise((r) => setTimeout(r, 1800));
    for (const [user, page] of Object.entries(pages)) Object.assign(result[user], await state(page));
    return result;
  },

  /**
   * The demo page on the example backend's endpoint: the greeting from `welcome.data`, an
   * rpc from the button, a publish the backend refuses; a screenshot to `args.artifacts`.
   */
  async demoBackend() {
    const tab = await (await browser()).newPage();
    tab.on("pageerror", (e) => console.error(`page error: ${e.message}`));
    await tab.setViewportSize({ width: 1000, height: 700 });
    await tab.goto(`${origin}/`);
    await tab.fill("#name", "Ada");
    await tab.fill("#room", "demo");
    await tab.click("#enter");
    await tab.waitForSelector("#text:not([disabled])");
    await tab.waitForSelector("#messages li:has-text('Welcome, Ada!')");
    await tab.click("#rpc");
    await tab.waitForSelector("#messages li:has-text('server time:')");
    await tab.fill("#text", "cheap spam");
    await tab.press("#text", "Enter");
    await tab.waitForSelector("#messages li:has-text('not sent')");
    await tab.fill("#text", "  hello   everyone ");
    await tab.press("#text", "Enter");
    await tab.waitForSelector("#messages li:has-text('hello everyone')");
    fs.mkdirSync(args.artifacts, { recursive: true });
    const shot = path.join(args.artifacts, "demo-backend.png");
    await tab.screenshot({ path: shot, fullPage: true });
    const messages = await tab.evaluate(() =>
      [...document.querySelectorAll("#messages li")].map((li) => li.textContent));
    const transport = await tab.evaluate(() => document.getElementById("transport").textContent);
    return { shot, messages, transport };
  },

  /** The demo page: two tabs chat; screenshots go to `args.artifacts`. */
  async demo() {
    const tabs = [await (await browser()).newPage(), await (await browser()).newPage()];
    for (const [i, tab] of tabs.entries()) {
      await tab.setViewportSize({ width: i === 0 ? 1000 : 390, height: 700 });
      await tab.goto(`${origin}/`);
      await tab.fill("#name", i === 0 ? "Ada" : "Grace");
      await tab.fill("#room", "demo");
      await tab.click("#enter");
      await tab.waitForSelector("#text:not([disabled])");
    }
    await tabs[0].fill("#text", "Hello from Ada");
    await tabs[0].press("#text", "Enter");
    await tabs[1].waitForSelector("#messages li:has-text('Hello from Ada')");
    await tabs[1].fill("#text", "Hi Ada, Grace here");
    await tabs[1].press("#text", "Enter");
    await tabs[0].waitForSelector("#messages li:has-text('Grace here')");
    await tabs[0].waitForSelector("#members li:has-text('Grace')");
    fs.mkdirSync(args.artifacts, { recursive: true });
    const shots = [];
    for (const [i, tab] of tabs.entries()) {
      const file = path.join(args.artifacts, `demo-tab-${i + 1}.png`);
      await tab.screenshot({ path: file, fullPage: true });
      shots.push(file);
    }
    const read = (tab) =>
      tab.evaluate(() => ({
        messages: [...document.querySelectorAll("#messages li")].map((li) => li.textContent),
        members: [...document.querySelectorAll("#members li")].map((li) => li.textContent),
        transport: document.getElementById("transport").textContent,
      }));
    return { shots, tabs: [await read(tabs[0]), await read(tabs[1])] };
  },
};

try {
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}`);
  console.log(JSON.stringify(await run()));
} finally {
  await chromium?.close();
}
