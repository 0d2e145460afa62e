// The Client under Node with a scripted WebSocket (no network): session lifecycle, rejoin
// with recovery, deduplication, request bookkeeping and close codes. The same behaviours run
// against the real gateway in headless Chromium (tests/tests/browser.rs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../client.js";

/** A WebSocket the test drives: `server.accept()`, `server.say(envelope)`, `server.drop(code)`. */
class FakeSocket {
  static OPEN = 1;
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }
  // The server's side.
  /** Opens and says `welcome`; resolves once the client has taken the session. */
  async accept(welcome = {}) {
    this.readyState = 1;
    this.onopen();
    this.say({ type: "welcome", session: `s${FakeSocket.all.length}`, user: "u", node: "n",
      transport: "websocket", heartbeat_ms: 60000, ...welcome });
    await new Promise((r) => setTimeout(r, 0));
  }
  refuse() {
    this.onerror();
    this.onclose({ code: 1006, reason: "" });
  }
  say(envelope) {
    this.onmessage({ data: JSON.stringify(envelope) });
  }
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason });
  }
  /** Answers the last request of `type` with `fields` (an ack unless `type` is given). */
  reply(type, fields = {}) {
    const request = [...this.sent].reverse().find((r) => r.type === type);
    this.say({ type: "ack", id: request.id, ...fields });
    return request;
  }
}
globalThis.WebSocket = FakeSocket;

const tick = () => new Promise((r) => setTimeout(r, 0));
const until = async (f) => {
  for (let i = 0; i < 200 && !f(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(f(), "condition not reached");
};
const newest = () => FakeSocket.all[FakeSocket.all.length - 1];

function open(options = {}) {
  FakeSocket.all = [];
  const events = [];
  const client = connect("https://gw.test/chat", {
    transports: ["websocket"],
    reconnect: { minDelayMs: 1, maxDelayMs: 2 },
    ...options,
  });
  for (const e of ["open", "transport", "reconnecting", "close", "resync"]) {
    client.on(e, (d) => events.push({ event: e, ...d }));
  }
  return { client, events, of: (name) => events.filter((e) => e.event === name) };
}

test("a session opens on welcome; requests made before it wait and then go out", async () => {
  const { client, of } = open({ token: "jwt" });
  await until(() => FakeSocket.all.length === 1);
  assert.equal(newest().url, "wss://gw.test/chat?token=jwt");
  const published = client.publish("r", { a: 1 });
  await newest().accept();
  assert.equal(client.transport, "websocket");
  assert.deepEqual(of("transport").map((e) => e.reason), ["preferred"]);
  await until(() => newest().sent.length === 1);
  const request = newest().reply("publish", { seq: 7 });
  assert.deepEqual(request.data, { a: 1 });
  assert.equal((await published).seq, 7);
  client.close();
});

test("a reconnection rejoins with since and epoch, replays once, and resyncs a lost epoch", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const got = [];
  const joining = client.join("r", (m) => got.push(m.seq));
  newest().reply("join", { room: "r", seq: 4, epoch: "e1" });
  // The ack and the next message in one go: the message is not dropped.
  newest().say({ type: "message", room: "r", seq: 5, data: 5 });
  await joining;
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 2);
  assert.equal(of("close")[0].willReconnect, true);
  await newest().accept();
  const rejoin = newest().sent.find((r) => r.type === "join");
  assert.deepEqual([rejoin.since, rejoin.epoch], [5, "e1"]);
  newest().say({ type: "ack", id: rejoin.id, room: "r", seq: 7, epoch: "e1", recovered: true });
  for (const seq of [5, 6, 7, 7, 8]) newest().say({ type: "message", room: "r", seq, data: seq });
  assert.deepEqual(got, [5, 6, 7, 8], "duplicates dropped");
  newest().drop(4008);
  await until(() => FakeSocket.all.length === 3);
  await newest().accept();
  const again = newest().sent.find((r) => r.type === "join");
  newest().say({ type: "ack", id: again.id, room: "r", seq: 2, epoch: "e2", recovered: false });
  newest().say({ type: "message", room: "r", seq: 3, data: 3 });
  assert.deepEqual(of("resync").map((e) => [e.room, e.reason, e.epoch, e.seq]), [["r", "recovery", "e2", 2]]);
  assert.deepEqual(got, [5, 6, 7, 8, 3], "the new epoch's messages are delivered");
  client.close();
});

test("a resync frame keeps the room, moves its position, is reported, and the rejoin asks from it", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const got = [];
  const joining = client.join("r", (m) => got.push(m.seq));
  newest().reply("join", { room: "r", seq: 4, epoch: "e1" });
  await joining;
  for (const seq of [5, 6]) newest().say({ type: "message", room: "r", seq, data: seq });
  // The room's sequence restarted in epoch e2: live messages follow seq 2.
  newest().say({ type: "resync", room: "r", epoch: "e2", seq: 2, reason: "continuity" });
  newest().say({ type: "message", room: "r", seq: 3, data: 3 });
  // A resync of a room this client is not in is not reported.
  newest().say({ type: "resync", room: "elsewhere", epoch: "x", seq: 1, reason: "continuity" });
  assert.deepEqual(of("resync"), [
    { event: "resync", room: "r", reason: "continuity", epoch: "e2", seq: 2 },
  ]);
  assert.deepEqual(got, [5, 6, 3], "the new epoch's messages are not taken for duplicates");
  // Slow session: messages up to 9 were dropped in e2.
  newest().say({ type: "resync", room: "r", epoch: "e2", seq: 9, reason: "dropped" });
  for (const seq of [8, 10]) newest().say({ type: "message", room: "r", seq, data: seq });
  assert.deepEqual(of("resync").at(-1), { event: "resync", room: "r", reason: "dropped", epoch: "e2", seq: 9 });
  assert.deepEqual(got, [5, 6, 3, 10]);
  assert.equal(newest().sent.filter((r) => r.type === "leave").length, 0, "still a member");
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 2);
  await newest().accept();
  const rejoin = newest().sent.find((r) => r.type === "join");
  assert.deepEqual([rejoin.room, rejoin.since, rejoin.epoch], ["r", 10, "e2"]);
  client.close();
});

test("a presence ack passes members, count and truncated through", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const listing = client.presence("big");
  const members = [{ user: "a", session: "s1", transport: "websocket" }];
  newest().reply("presence", { members, count: 2000, truncated: true });
  const ack = await listing;
  assert.deepEqual([ack.members, ack.count, ack.truncated], [members, 2000, true]);
  client.close();
});

test("final close codes stay closed and settle waiting requests; 4001 needs getTicket", async () => {
  for (const [code, options, reconnects] of [
    [1000, {}, false], [4003, {}, false], [4001, { token: "t" }, false],
    [4001, { getTicket: async () => "fresh" }, true], [1011, {}, true],
  ]) {
    const { client, of } = open(options);
    await until(() => FakeSocket.all.length === 1);
    await newest().accept();
    const pending = client.presence("r");
    newest().drop(code);
    await assert.rejects(pending, (e) => e.code === "connection_lost");
    assert.equal(of("close")[0].willReconnect, reconnects, `code ${code}`);
    if (reconnects) {
      await until(() => FakeSocket.all.length === 2);
      if (options.getTicket) assert.match(newest().url, /ticket=fresh/);
    } else {
      await tick();
      assert.equal(FakeSocket.all.length, 1, `code ${code} stays closed`);
      await assert.rejects(client.publish("r", 1), (e) => e.code === "closed");
    }
    client.close();
  }
});

test("close() before welcome leaves nothing running", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  const socket = newest();
  // Connected, waiting for `welcome`, when the application closes.
  socket.readyState = 1;
  socket.onopen();
  await tick();
  client.close();
  socket.say({ type: "welcome", session: "s", user: "u", node: "n", heartbeat_ms: 60000 });
  await tick();
  assert.equal(of("open").length, 0);
  assert.equal(client.transport, null);
  assert.equal(socket.closedWith, 1000);
});

test("a handler that throws does not stop delivery", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const got = [];
  const joining = client.join("r", (m) => {
    got.push(m.seq);
    if (m.seq === 1) throw new Error("application bug");
  });
  newest().reply("join", { room: "r", seq: 0, epoch: "e" });
  await joining;
  const uncaught = [];
  globalThis.reportError = (e) => uncaught.push(e.message);
  newest().say({ type: "message", room: "r", seq: 1, data: 1 });
  newest().say({ type: "message", room: "r", seq: 2, data: 2 });
  delete globalThis.reportError;
  assert.deepEqual(got, [1, 2]);
  assert.deepEqual(uncaught, ["application bug"], "reported, not swallowed");
  client.close();
});

test("a room left before its join was acknowledged is not joined again", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const joining = client.join("r", () => {});
  const leaving = client.leave("r");
  newest().reply("join", { room: "r", seq: 0, epoch: "e" });
  newest().reply("leave");
  await Promise.all([joining, leaving]);
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 2);
  await newest().accept();
  await tick();
  assert.equal(newest().sent.filter((r) => r.type === "join").length, 0);
  client.close();
});

test("a refused rejoin untracks the room and says so", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const joining = client.join("r", () => {});
  newest().reply("join", { room: "r", seq: 0, epoch: "e" });
  await joining;
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 2);
  await newest().accept();
  const rejoin = newest().sent.find((r) => r.type === "join");
  newest().say({ type: "error", id: rejoin.id, code: "forbidden", message: "no" });
  await tick();
  assert.deepEqual(of("resync").map((e) => [e.room, e.reason, e.error.code]), [["r", "refused", "forbidden"]]);
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 3);
  await newest().accept();
  await tick();
  assert.equal(newest().sent.filter((r) => r.type === "join").length, 0);
  client.close();
});

test("a reconnect frame's after_ms replaces the backoff", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  newest().say({ type: "reconnect", after_ms: 30, reason: "drain" });
  newest().drop(1001);
  assert.deepEqual(of("reconnecting").map((e) => [e.delayMs, e.code]), [[30, 1001]]);
  await until(() => FakeSocket.all.length === 2);
  client.close();
});

test("a session that dies right after opening does not reset the backoff", async () => {
  const { client, of } = open({ reconnect: { minDelayMs: 1, maxDelayMs: 1000 } });
  for (let i = 1; i <= 4; i++) {
    await until(() => FakeSocket.all.length === i);
    await newest().accept();
    newest().drop(1011);
  }
  const attempts = of("reconnecting").map((e) => e.attempt);
  assert.deepEqual(attempts, [1, 2, 3, 4]);
  client.close();
});

test("the open event carries welcome.data when the server sent some", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept({ data: { greeting: "hi alice", rooms: ["lobby"] } });
  assert.deepEqual(of("open")[0].data, { greeting: "hi alice", rooms: ["lobby"] });
  assert.equal(of("open")[0].user, "u");
  newest().drop(1006);
  await until(() => FakeSocket.all.length === 2);
  await newest().accept();
  assert.equal("data" in of("open")[1], false, "no data: no field");
  client.close();
});

test("rpc resolves with the ack's data and rejects with an Error carrying code and message", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const answered = client.rpc("echo", { a: [1, 2] });
  const refused = client.rpc("nope");
  const [echo, nope] = newest().sent.filter((r) => r.type === "rpc");
  assert.deepEqual(echo, { type: "rpc", method: "echo", data: { a: [1, 2] }, id: echo.id });
  assert.equal("data" in nope, false, "no data: no field");
  assert.notEqual(echo.id, nope.id);
  // Answered out of order, each by its id.
  newest().say({ type: "error", id: nope.id, code: "rejected", message: "unknown method nope" });
  newest().say({ type: "ack", id: echo.id, data: { a: [1, 2] } });
  assert.deepEqual(await answered, { a: [1, 2] });
  await assert.rejects(refused, (e) => {
    assert.ok(e instanceof Error, "an Error");
    assert.equal(e.name, "GatewayError");
    assert.deepEqual([e.code, e.message, e.type, e.id], ["rejected", "unknown method nope", "error", nope.id]);
    return true;
  });
  // An ack without data resolves with undefined.
  const empty = client.rpc("ping");
  newest().reply("rpc");
  assert.equal(await empty, undefined);
  await assert.rejects(client.rpc("bin", new Uint8Array([1])), (e) => e.code === "bad_request");
  client.close();
});

test("an unanswered rpc times out; its late answer is ignored and the next call works", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const started = Date.now();
  const slow = client.rpc("sleep", { ms: 1000 }, { timeoutMs: 40 });
  await assert.rejects(slow, (e) => e instanceof Error && e.code === "timeout" && /rpc sleep/.test(e.message));
  assert.ok(Date.now() - started >= 35, "not before timeoutMs");
  const late = newest().sent.find((r) => r.type === "rpc");
  newest().say({ type: "ack", id: late.id, data: "late" });
  const next = client.rpc("time");
  newest().reply("rpc", { data: 42 });
  assert.equal(await next, 42);
  client.close();
});

test("rpcs in flight reject with connection_lost when the session ends and are not sent again", async () => {
  const { client, of } = open();
  await until(() => FakeSocket.all.length === 1);
  await newest().accept();
  const pending = [client.rpc("a"), client.rpc("b", 1, { timeoutMs: 60000 })];
  newest().drop(1011);
  for (const p of pending) await assert.rejects(p, (e) => e instanceof Error && e.code === "connection_lost");
  await until(() => FakeSocket.all.length === 2);
  await newest().accept();
  await tick();
  assert.equal(newest().sent.filter((r) => r.type === "rpc").length, 0, "not resent");
  assert.equal(of("open").length, 2);
  // After close(), calls reject at once with `closed`.
  client.close();
  await assert.rejects(client.rpc("a"), (e) => e instanceof Error && e.code === "closed");
});

test("an rpc made while disconnected goes out on the next session within its timeout", async () => {
  const { client } = open();
  await until(() => FakeSocket.all.length === 1);
  const waiting = client.rpc("time");
  const expires = client.rpc("time", null, { timeoutMs: 30 });
  await assert.rejects(expires, (e) => e.code === "timeout" && /waiting for a connection/.test(e.message));
  await newest().accept();
  await until(() => newest().sent.some((r) => r.type === "rpc"));
  assert.equal(newest().sent.filter((r) => r.type === "rpc").length, 1, "the expired call is not sent");
  newest().reply("rpc", { data: "now" });
  assert.equal(await waiting, "now");
  client.close();
});
