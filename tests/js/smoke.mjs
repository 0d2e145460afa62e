// Headless Chromium smoke check: from a page served by the gateway, open a WebTransport
// session (trusting the dev certificate by its hash) and a WebSocket (trusting it by its
// SPKI hash), exchange framed messages, and chat across the two transports in one room.
// Usage: node smoke.mjs PORT CERT_SHA256_HEX SPKI_SHA256_BASE64  -> prints one JSON line.
import { launchChromium } from "./browser.mjs";

const [port, certHash, spki] = process.argv.slice(2);
const chromium = await launchChromium(spki);
const browser = chromium.browser;
try {
  const page = await browser.newPage();
  await page.goto(`https://127.0.0.1:${port}/`);
  const result = await page.evaluate(async ({ port, certHash }) => {
    const frame = (obj) => {
      const payload = new TextEncoder().encode(JSON.stringify(obj));
      const out = new Uint8Array(5 + payload.length);
      new DataView(out.buffer).setUint32(1, payload.length);
      out.set(payload, 5);
      return out;
    };
    const value = Uint8Array.from(certHash.match(/../g).map((h) => parseInt(h, 16)));
    const wt = new WebTransport(`https://127.0.0.1:${port}/chat`, {
      serverCertificateHashes: [{ algorithm: "sha-256", value }],
    });
    await wt.ready;
    const stream = await wt.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    const reader = stream.readable.getReader();
    let buf = new Uint8Array(0);
    const nextFrame = async () => {
      for (;;) {
        if (buf.length >= 5) {
          const len = new DataView(buf.buffer, buf.byteOffset).getUint32(1);
          if (buf.length >= 5 + len) {
            const kind = buf[0];
            const body = buf.slice(5, 5 + len);
            buf = buf.slice(5 + len);
            return { kind, json: kind === 0 ? JSON.parse(new TextDecoder().decode(body)) : null };
          }
        }
        const { value, done } = await reader.read();
        if (done) throw new Error("message stream ended");
        const joined = new Uint8Array(buf.length + value.length);
        joined.set(buf); joined.set(value, buf.length); buf = joined;
      }
    };
    await writer.write(frame({ type: "hello" }));
    const welcome = (await nextFrame()).json;
    await writer.write(frame({ type: "join", room: "browser", id: 1 }));
    const joinAck = (await nextFrame()).json;

    const ws = new WebSocket(`wss://127.0.0.1:${port}/chat`);
    const wsQueue = [];
    let wake = null;
    ws.onmessage = (e) => { wsQueue.push(JSON.parse(e.data)); if (wake) wake(); };
    const wsNext = async () => {
      while (!wsQueue.length) await new Promise((r) => (wake = r));
      return wsQueue.shift();
    };
    await new Promise((res, rej) => { ws.onopen = res; ws.onerror = () => rej(new Error("wss failed")); });
    const wsWelcome = await wsNext();
    ws.send(JSON.stringify({ type: "join", room: "browser", id: 2 }));
    await wsNext(); // ack
    const presence = (await nextFrame()).json;
    ws.send(JSON.stringify({ type: "publish", room: "browser", data: "from wss" }));
    await wsNext(); // ack of the publish
    const fromWs = (await nextFrame()).json;
    await writer.write(frame({ type: "publish", room: "browser", data: "from webtransport" }));
    await nextFrame(); // ack
    const fromWt = await wsNext();
    wt.close();
    ws.close();
    return { welcome, joinAck, wsWelcome, presence, fromWs, fromWt };
  }, { port, certHash });
  console.log(JSON.stringify(result));
} finally {
  await chromium.close();
}
