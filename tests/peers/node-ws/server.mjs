// Benchmark peer 1: the seeds' approach. A Node `ws` server over TLS (same certificate as
// the gateway) implementing the benchmark's subset of PROTOCOL.md: welcome, join (ack),
// binary publish (ack, then a binary `message` envelope to every room member through a
// loop over members with `client.send` when `readyState === OPEN`).
// Usage: node server.mjs PORT CERT_PEM KEY_PEM
import fs from "node:fs";
import https from "node:https";
import WebSocket, { WebSocketServer } from "ws";

const [port, cert, key] = process.argv.slice(2);
const server = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
const wss = new WebSocketServer({ server, path: "/chat", perMessageDeflate: false });
const rooms = new Map();
let next = 0;

wss.on("connection", (ws) => {
  const id = `node-${next++}`;
  ws.joined = new Set();
  ws.send(JSON.stringify({ type: "welcome", session: id, user: id, endpoint: "/chat",
    transport: "websocket", heartbeat_ms: 25000, node: "node-ws" }));
  ws.on("message", (data, isBinary) => {
    if (!isBinary) {
      const m = JSON.parse(data.toString());
      if (m.type === "join") {
        let room = rooms.get(m.room);
        if (!room) rooms.set(m.room, (room = { seq: 0, members: new Set() }));
        room.members.add(ws);
        ws.joined.add(m.room);
        ws.send(JSON.stringify({ type: "ack", id: m.id, room: m.room, seq: room.seq, members: room.members.size }));
      }
      return;
    }
    const headerLen = data.readUInt16BE(0);
    const header = JSON.parse(data.subarray(2, 2 + headerLen).toString());
    const room = rooms.get(header.room);
    const seq = room ? ++room.seq : 1;
    if (room) {
      const out = Buffer.from(JSON.stringify({ type: "message", room: header.room, from: id, seq }));
      const len = Buffer.alloc(2);
      len.writeUInt16BE(out.length);
      const frame = Buffer.concat([len, out, data.subarray(2 + headerLen)]);
      room.members.forEach((client) => {
        if (client !== ws && client.readyState === WebSocket.OPEN) client.send(frame);
      });
    }
    ws.send(JSON.stringify({ type: "ack", id: header.id, seq }));
  });
  ws.on("close", () => {
    for (const name of ws.joined) rooms.get(name)?.members.delete(ws);
  });
});

server.listen(Number(port), "127.0.0.1", () => console.log(`listening https+wss on 127.0.0.1:${port} (tcp)`));
