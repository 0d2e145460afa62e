// Benchmark peer 2: uWebSockets.js (npm `@trufflesuite/uws-js-unofficial` 20.30.0, an
// unofficial repackaging of uWebSockets.js v20.30 with its prebuilt binaries) over TLS with
// the gateway's certificate, using its native pub/sub for the same protocol subset as the
// Node ws peer.
// Usage: node server.mjs PORT CERT_PEM KEY_PEM
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const uWS = require("@trufflesuite/uws-js-unofficial");
const [port, cert, key] = process.argv.slice(2);
const decoder = new TextDecoder();
const seqs = new Map();
let next = 0;

const app = uWS.SSLApp({ cert_file_name: cert, key_file_name: key });
app.ws("/chat", {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  maxBackpressure: 64 * 1024 * 1024,
  idleTimeout: 0,
  open: (ws) => {
    const id = `uws-${next++}`;
    ws.getUserData().id = id;
    ws.send(JSON.stringify({ type: "welcome", session: id, user: id, endpoint: "/chat",
      transport: "websocket", heartbeat_ms: 25000, node: "uws" }));
  },
  message: (ws, message, isBinary) => {
    if (!isBinary) {
      const m = JSON.parse(decoder.decode(message));
      if (m.type === "join") {
        ws.subscribe(m.room);
        ws.send(JSON.stringify({ type: "ack", id: m.id, room: m.room, seq: seqs.get(m.room) ?? 0,
          members: app.numSubscribers(m.room) }));
      }
      return;
    }
    const bytes = new Uint8Array(message);
    const headerLen = (bytes[0] << 8) | bytes[1];
    const header = JSON.parse(decoder.decode(bytes.subarray(2, 2 + headerLen)));
    const seq = (seqs.get(header.room) ?? 0) + 1;
    seqs.set(header.room, seq);
    const out = Buffer.from(JSON.stringify({ type: "message", room: header.room, from: ws.getUserData().id, seq }));
    const frame = Buffer.alloc(2 + out.length + bytes.length - 2 - headerLen);
    frame.writeUInt16BE(out.length, 0);
    out.copy(frame, 2);
    frame.set(bytes.subarray(2 + headerLen), 2 + out.length);
    app.publish(header.room, frame, true);
    ws.send(JSON.stringify({ type: "ack", id: header.id, seq }));
  },
});
app.listen("127.0.0.1", Number(port), (token) => {
  if (!token) {
    console.error(`cannot listen on ${port}`);
    process.exit(1);
  }
  console.log(`listening https+wss on 127.0.0.1:${port} (tcp)`);
});
