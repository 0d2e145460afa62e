// Interop check with Node's `ws` (a WebSocket client nobody here wrote): text and binary
// envelopes, echo, and a refused upgrade.
// Usage: node ws-client.mjs PORT CERT_PEM  -> prints one JSON line.
import fs from "node:fs";
import WebSocket from "ws";

const [port, certPath] = process.argv.slice(2);
const ca = fs.readFileSync(certPath);
const url = (path) => `wss://127.0.0.1:${port}${path}`;

function open(path) {
  const ws = new WebSocket(url(path), { ca });
  const queue = [];
  let wake = null;
  ws.on("message", (data, isBinary) => {
    queue.push(isBinary ? { binary: Buffer.from(data) } : JSON.parse(data.toString()));
    if (wake) wake();
  });
  const next = async () => {
    while (!queue.length) await new Promise((r) => (wake = r));
    return queue.shift();
  };
  return new Promise((resolve, reject) => {
    ws.on("open", () => resolve({ ws, next }));
    ws.on("unexpected-response", (_req, res) => reject(new Error(`status ${res.statusCode}`)));
    ws.on("error", reject);
  });
}

const out = {};
const a = await open("/chat");
out.welcome = await a.next();
a.ws.send(JSON.stringify({ type: "join", room: "node", id: 1 }));
out.join = await a.next();
a.ws.send(JSON.stringify({ type: "publish", room: "node", id: 2, data: { hello: "node" }, echo: true }));
out.first = await a.next();
out.second = await a.next();
const header = Buffer.from(JSON.stringify({ type: "publish", room: "node", id: 3, echo: true }));
const len = Buffer.alloc(2);
len.writeUInt16BE(header.length);
a.ws.send(Buffer.concat([len, header, Buffer.from([1, 2, 3, 250])]));
const replies = [await a.next(), await a.next()];
const bin = replies.find((r) => r.binary);
const n = bin.binary.readUInt16BE(0);
out.binaryHeader = JSON.parse(bin.binary.subarray(2, 2 + n).toString());
out.binaryPayload = [...bin.binary.subarray(2 + n)];
out.binaryAck = replies.find((r) => !r.binary);
try {
  await open("/nowhere");
  out.unknownPath = "opened";
} catch (e) {
  out.unknownPath = e.message;
}
a.ws.close(1000);
await new Promise((r) => a.ws.on("close", (code) => { out.closeCode = code; r(); }));
console.log(JSON.stringify(out));
