// Unit tests of the client's protocol logic (no sockets): backoff, close codes, framing,
// sequence tracking and deduplication, request bookkeeping, URLs.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay,
  closeAction,
  decodeBinary,
  encodeBinary,
  encodeFrame,
  FrameReader,
  Requests,
  RoomTracker,
  transportUrls,
} from "../client.js";

const bounds = { minDelayMs: 250, maxDelayMs: 10000 };

test("backoff grows exponentially, is capped, and jitters over the whole range", () => {
  assert.equal(backoffDelay(0, bounds, () => 1), 250);
  assert.equal(backoffDelay(3, bounds, () => 1), 2000);
  assert.equal(backoffDelay(10, bounds, () => 1), 10000);
  assert.equal(backoffDelay(1000, bounds, () => 1), 10000);
  assert.equal(backoffDelay(5, bounds, () => 0), 0);
  assert.equal(backoffDelay(2, bounds, () => 0.5), 500);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(4, bounds);
    assert.ok(d >= 0 && d <= 4000, `${d}`);
  }
});

test("close codes decide between staying closed, reauthenticating and reconnecting", () => {
  for (const code of [1000, 1008, 1009, 4003]) assert.equal(closeAction(code), "stay");
  assert.equal(closeAction(4001), "reauth");
  for (const code of [1001, 1006, 1011, 4008, 4009]) assert.equal(closeAction(code), "reconnect");
});

test("binary envelopes round-trip header and payload", () => {
  const bytes = encodeBinary({ type: "publish", room: "r", id: 3 }, new Uint8Array([0, 1, 255]));
  assert.equal(new DataView(bytes.buffer).getUint16(0), '{"type":"publish","room":"r","id":3}'.length);
  const { header, payload } = decodeBinary(bytes);
  assert.deepEqual(header, { type: "publish", room: "r", id: 3 });
  assert.deepEqual([...payload], [0, 1, 255]);
  // An ArrayBuffer and a view into a larger buffer work too.
  const big = new Uint8Array([9, 9, 7, 8, 9]);
  assert.deepEqual([...decodeBinary(encodeBinary({}, big.subarray(2, 4))).payload], [7, 8]);
  assert.deepEqual([...decodeBinary(encodeBinary({}, new Uint16Array([1]).buffer)).payload], [1, 0]);
});

test("frames are reassembled across arbitrary chunk boundaries", () => {
  const a = encodeFrame(0, new TextEncoder().encode('{"type":"hello"}'));
  const b = encodeFrame(1, new Uint8Array(300).fill(7));
  const all = new Uint8Array([...a, ...b]);
  for (const cut of [1, 4, 5, a.length, a.length + 3, all.length - 1]) {
    const reader = new FrameReader();
    const frames = [...reader.push(all.subarray(0, cut)), ...reader.push(all.subarray(cut))];
    assert.equal(frames.length, 2, `cut ${cut}`);
    assert.equal(frames[0].kind, 0);
    assert.equal(new TextDecoder().decode(frames[0].payload), '{"type":"hello"}');
    assert.equal(frames[1].kind, 1);
    assert.equal(frames[1].payload.length, 300);
  }
  const reader = new FrameReader();
  assert.deepEqual(reader.push(new Uint8Array([0, 0, 0])), []);
});

test("room tracking delivers each seq once, in order, and volatile messages always", () => {
  const rooms = new RoomTracker();
  assert.equal(rooms.accept("r", 1), false, "untracked room");
  rooms.joined("r", { seq: 4, epoch: "e1" });
  assert.equal(rooms.accept("r", 4), false, "already before the join");
  assert.equal(rooms.accept("r", 5), true);
  assert.equal(rooms.accept("r", 5), false, "duplicate");
  assert.equal(rooms.accept("r", 6), true);
  assert.equal(rooms.accept("r", undefined), true, "volatile");
  assert.deepEqual(rooms.position("r"), { since: 6, epoch: "e1" });
  rooms.left("r");
  assert.equal(rooms.position("r"), null);
});

test("a recovered rejoin continues; an unrecovered one restarts tracking in its epoch", () => {
  const rooms = new RoomTracker();
  rooms.joined("r", { seq: 10, epoch: "e1" });
  assert.equal(rooms.rejoined("r", { seq: 12, epoch: "e1", recovered: true }), true);
  assert.equal(rooms.accept("r", 11), true, "replayed messages are delivered");
  assert.equal(rooms.rejoined("r", { seq: 3, epoch: "e2", recovered: false }), false);
  assert.deepEqual(rooms.position("r"), { since: 3, epoch: "e2" });
  assert.equal(rooms.accept("r", 4), true, "the new epoch's next message is not a duplicate");
  assert.equal(rooms.accept("r", 3), false);
});

test("a resync frame moves the position to its epoch and seq, never back within an epoch", () => {
  const rooms = new RoomTracker();
  assert.equal(rooms.resynced("r", { epoch: "e2", seq: 0 }), false, "untracked room");
  rooms.joined("r", { seq: 10, epoch: "e1" });
  // continuity: the sequence restarted in a new epoch, lower than before.
  assert.equal(rooms.resynced("r", { epoch: "e2", seq: 2 }), true);
  assert.deepEqual(rooms.position("r"), { since: 2, epoch: "e2" });
  assert.equal(rooms.accept("r", 3), true, "the new epoch's next message is delivered");
  // dropped: same epoch, messages up to seq skipped.
  assert.equal(rooms.resynced("r", { epoch: "e2", seq: 9 }), true);
  assert.deepEqual(rooms.position("r"), { since: 9, epoch: "e2" });
  assert.equal(rooms.accept("r", 8), false);
  assert.equal(rooms.accept("r", 10), true);
  assert.equal(rooms.resynced("r", { epoch: "e2", seq: 7 }), true);
  assert.deepEqual(rooms.position("r"), { since: 10, epoch: "e2" }, "not back within an epoch");
});

test("requests settle once by id, reject errors, and time out", async () => {
  const requests = new Requests();
  const seen = [];
  const a = requests.open((v) => seen.push(["ok", v.id]), (e) => seen.push(["err", e.code]), 0, "a");
  const b = requests.open((v) => seen.push(["ok", v.id]), (e) => seen.push(["err", e.code]), 0, "b");
  assert.notEqual(a, b);
  assert.equal(requests.settle({ type: "ack", id: a }), true);
  assert.equal(requests.settle({ type: "ack", id: a }), false, "only once");
  assert.equal(requests.settle({ type: "error", id: b, code: "forbidden" }), true);
  assert.deepEqual(seen, [["ok", a], ["err", "forbidden"]]);
  const timedOut = new Promise((resolve, reject) => requests.open(resolve, reject, 20, "slow"));
  await assert.rejects(timedOut, (e) => e.code === "timeout");
  const lost = [1, 2, 3].map(() => new Promise((res, rej) => requests.open(res, rej, 0, "x")));
  requests.failAll({ type: "error", code: "connection_lost", message: "gone" });
  for (const p of lost) await assert.rejects(p, (e) => e.code === "connection_lost");
  assert.equal(requests.size, 0);
});

test("transport URLs derive from either scheme and keep overrides", () => {
  assert.deepEqual(transportUrls("https://h:4433/chat"), {
    webtransport: "https://h:4433/chat",
    websocket: "wss://h:4433/chat",
  });
  assert.deepEqual(transportUrls("wss://h:4433/chat?x=1"), {
    webtransport: "https://h:4433/chat?x=1",
    websocket: "wss://h:4433/chat?x=1",
  });
  assert.equal(
    transportUrls("https://h/chat", { webtransport: "https://h:9/chat" }).webtransport,
    "https://h:9/chat",
  );
});
