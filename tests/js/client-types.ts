// Type-checks the browser client's declarations (clients/js/client.d.ts) against the API
// as applications use it; run by scripts/test-all.sh with `tsc --noEmit`.
import { connect, backoffDelay, closeAction, GatewayError, type RoomMessage, type Ack, type ErrorEnvelope, type RpcErrorCode } from "../../clients/js/client.js";
const client = connect("https://h:4433/chat", {
  token: "t",
  getTicket: async () => "x",
  transports: ["webtransport", "websocket"],
  serverCertificateHashes: [{ algorithm: "sha-256", value: new Uint8Array(32) }],
  webtransportTimeoutMs: 3000,
  urls: { webtransport: "https://h:1/chat" },
  reconnect: { minDelayMs: 250, maxDelayMs: 10000 },
  reprobeMs: 300000,
});
client.on("open", ({ transport, session, user, node, data }) => console.log(transport, session, user, node, data));
client.on("transport", ({ transport, reason }) => console.log(transport, reason));
client.on("reconnecting", ({ attempt, delayMs, code }) => console.log(attempt + delayMs + code));
client.on("close", ({ code, reason, willReconnect }) => console.log(code, reason, willReconnect));
client.on("resync", ({ room }) => console.log(room));
client.on("resync", (e) => {
  if (e.reason === "refused") console.log(e.room, e.error.code);
  else {
    const position: [string, number] = [e.epoch, e.seq];
    const why: "continuity" | "dropped" | "recovery" = e.reason;
    console.log(e.room, position, why);
  }
});
client.on("direct", ({ from, data }) => console.log(from, data));
client.on("presence", ({ room, event, user }) => console.log(room, event, user));
async function main() {
  const ack: Ack = await client.join("room", (msg: RoomMessage) => console.log(msg.seq, msg.data));
  await client.publish("room", new Uint8Array([1]), { echo: false, volatile: false });
  await client.send("u", { a: 1 });
  const listing = await client.presence("room");
  const shown: number = Array.isArray(listing.members) ? listing.members.length : 0;
  if (listing.truncated) console.log(`${shown} of ${listing.count ?? shown}`);
  await client.leave("room");
  const t: "webtransport" | "websocket" | null = client.transport;
  client.close();
  const d: number = backoffDelay(1, { minDelayMs: 1, maxDelayMs: 2 });
  const a: "stay" | "reauth" | "reconnect" = closeAction(1000);
  try { await client.publish("r", 1); } catch (e) { const err = e as ErrorEnvelope; console.log(err.code, ack, t, d, a); }
  const now = await client.rpc<{ now: string }>("time");
  console.log(now.now, await client.rpc("echo", { a: 1 }, { timeoutMs: 500 }));
  try {
    await client.rpc("nope");
  } catch (e) {
    if (e instanceof GatewayError) {
      const code: RpcErrorCode = e.code;
      const envelope: ErrorEnvelope = e;
      console.log(code, e.message, envelope.type, e.id);
    }
  }
}
main();
