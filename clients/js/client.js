// Browser client of the gateway: WebTransport first, WebSocket fallback that moves back
// up, reconnection with exact recovery. No dependencies; one ES module. The wire contract
// is PROTOCOL.md; the API is documented in client.d.ts and the README.

const DEFAULTS = {
  transports: ["webtransport", "websocket"],
  webtransportTimeoutMs: 3000,
  reconnect: { minDelayMs: 250, maxDelayMs: 10000 },
  reprobeMs: 300000,
  requestTimeoutMs: 30000,
  maxQueuedRequests: 1000,
};

/** How long a new session may take to say `welcome` (first-message auth takes up to 5 s). */
const WELCOME_TIMEOUT_MS = 10000;

/** Close codes after which the client stays closed (PROTOCOL.md section 8). */
const FINAL_CODES = new Set([1000, 1008, 1009, 4003]);

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------
// Protocol logic without I/O (unit-tested under Node).

/**
 * The delay before reconnection attempt `attempt` (0-based): exponential backoff with full
 * jitter, a uniform draw in [0, min(maxDelayMs, minDelayMs * 2^attempt)], never below 0.
 */
export function backoffDelay(attempt, { minDelayMs, maxDelayMs }, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 30));
  return Math.round(random() * ceiling);
}

/** What a client does after a session closed with `code`: "stay", "reauth" or "reconnect". */
export function closeAction(code) {
  if (FINAL_CODES.has(code)) return "stay";
  if (code === 4001) return "reauth";
  return "reconnect";
}

/** Whether `data` travels as a binary envelope. */
export function isBinary(data) {
  return data instanceof ArrayBuffer || ArrayBuffer.isView(data);
}

function bytesOf(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** A binary envelope (PROTOCOL.md section 6): u16 header length, JSON header, payload. */
export function encodeBinary(header, payload) {
  const head = encoder.encode(JSON.stringify(header));
  const body = bytesOf(payload);
  const out = new Uint8Array(2 + head.length + body.length);
  new DataView(out.buffer).setUint16(0, head.length);
  out.set(head, 2);
  out.set(body, 2 + head.length);
  return out;
}

/** Splits a binary envelope into its header object and payload bytes. */
export function decodeBinary(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const len = view.getUint16(0);
  const header = JSON.parse(decoder.decode(bytes.subarray(2, 2 + len)));
  return { header, payload: bytes.slice(2 + len) };
}

/** One WebTransport frame: kind (0 JSON, 1 binary), u32 length, payload. */
export function encodeFrame(kind, payload) {
  const out = new Uint8Array(5 + payload.length);
  out[0] = kind;
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

/** Reassembles WebTransport frames from stream chunks. */
export class FrameReader {
  #buf = new Uint8Array(0);

  /** Adds a chunk; returns the frames it completed as `{ kind, payload }`. */
  push(chunk) {
    const joined = new Uint8Array(this.#buf.length + chunk.length);
    joined.set(this.#buf);
    joined.set(chunk, this.#buf.length);
    const frames = [];
    let at = 0;
    while (joined.length - at >= 5) {
      const len = new DataView(joined.buffer, at + 1, 4).getUint32(0);
      if (joined.length - at - 5 < len) break;
      frames.push({ kind: joined[at], payload: joined.slice(at + 5, at + 5 + len) });
      at += 5 + len;
    }
    this.#buf = joined.slice(at);
    return frames;
  }
}

/**
 * Per-room sequence tracking: the last `seq` and `epoch` seen, for `since` on a rejoin, and
 * deduplication when two sessions overlap (a re-probe) or a replay meets live delivery.
 */
export class RoomTracker {
  #rooms = new Map();

  /** Starts tracking `room` from its join `ack`. */
  joined(room, ack) {
    this.#rooms.set(room, { seq: ack.seq ?? 0, epoch: ack.epoch ?? null });
  }

  /** Stops tracking `room`. */
  left(room) {
    this.#rooms.delete(room);
  }

  has(room) {
    return this.#rooms.has(room);
  }

  rooms() {
    return [...this.#rooms.keys()];
  }

  /** The `since` and `epoch` of a rejoin of `room`. */
  position(room) {
    const r = this.#rooms.get(room);
    return r ? { since: r.seq, epoch: r.epoch } : null;
  }

  /**
   * The `ack` of a rejoin: `true` when the room continues (recovered), `false` when it
   * must resynchronise; tracking then restarts at the ack's `seq` in its epoch.
   */
  rejoined(room, ack) {
    const r = this.#rooms.get(room);
    if (!r) return true;
    if (ack.recovered === true && ack.epoch === r.epoch) return true;
    r.seq = ack.seq ?? 0;
    r.epoch = ack.epoch ?? null;
    return false;
  }

  /** Whether a message of `room` with `seq` is new (and records it); volatile ones are. */
  accept(room, seq) {
    const r = this.#rooms.get(room);
    if (!r) return false;
    if (seq === undefined || seq === null) return true;
    if (seq <= r.seq) return false;
    r.seq = seq;
    return true;
  }
}

/** Request ids and the promises waiting for their `ack`, `error` or `pong`. */
export class Requests {
  #next = 1;
  #waiting = new Map();

  /** A new id whose reply settles `resolve` / `reject`. */
  open(resolve, reject, timeoutMs, label) {
    const id = this.#next++;
    const timer =
      timeoutMs > 0
        ? setTimeout(() => this.fail(id, clientError("timeout", `${label} timed out`)), timeoutMs)
        : null;
    this.#waiting.set(id, { resolve, reject, timer });
    return id;
  }

  /** Settles the request `envelope` answers; returns whether one was waiting. */
  settle(envelope) {
    const entry = this.#waiting.get(envelope.id);
    if (!entry) return false;
    this.#waiting.delete(envelope.id);
    if (entry.timer) clearTimeout(entry.timer);
    if (envelope.type === "error") entry.reject(envelope);
    else entry.resolve(envelope);
    return true;
  }

  /** Rejects request `id` with `error`. */
  fail(id, error) {
    this.settle({ ...error, id });
  }

  /** Rejects every waiting request listed in `ids` (all when omitted). */
  failAll(error, ids = [...this.#waiting.keys()]) {
    for (const id of ids) this.fail(id, error);
  }

  get size() {
    return this.#waiting.size;
  }
}

/** An error the client raises itself, shaped like the server's `error` envelope. */
export function clientError(code, message) {
  return { type: "error", code, message };
}

/** The WebTransport and WebSocket URLs of `url` (either scheme), with `overrides`. */
export function transportUrls(url, overrides = {}) {
  const base = new URL(url);
  const https = new URL(base);
  https.protocol = base.protocol === "ws:" || base.protocol === "http:" ? "http:" : "https:";
  const wss = new URL(base);
  wss.protocol = https.protocol === "http:" ? "ws:" : "wss:";
  return {
    webtransport: overrides.webtransport ?? https.toString(),
    websocket: overrides.websocket ?? wss.toString(),
  };
}

function withCredential(url, credential) {
  const u = new URL(url);
  if (credential) u.searchParams.set(credential.kind, credential.value);
  return u.toString();
}

// ---------------------------------------------------------------------------------------
// Transports: each yields envelopes and then its end to the listener `listen` attaches;
// what arrives before (a `welcome` can come as soon as the stream opens) is kept for it.

class Transport {
  #backlog = [];
  #ended = null;
  #envelope = null;
  #close = null;

  /** Attaches the listener and hands it what arrived before. */
  listen(onenvelope, onclose) {
    this.#envelope = onenvelope;
    this.#close = onclose;
    for (const args of this.#backlog.splice(0)) onenvelope(...args);
    if (this.#ended) onclose(this.#ended);
  }

  /** Detaches the listener: nothing more is reported. */
  mute() {
    this.#envelope = () => {};
    this.#close = () => {};
  }

  emitEnvelope(envelope, payload, datagram) {
    if (this.#envelope) this.#envelope(envelope, payload, datagram);
    else this.#backlog.push([envelope, payload, datagram]);
  }

  emitClose(info) {
    if (this.#ended) return;
    this.#ended = info;
    this.#close?.(info);
  }
}

class WebSocketTransport extends Transport {
  name = "websocket";

  constructor(url) {
    super();
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this.ws.onerror = () => reject(new Error("websocket failed"));
    });
    this.ws.onmessage = (e) => {
      if (typeof e.data === "string") this.emitEnvelope(JSON.parse(e.data), null, false);
      else {
        const { header, payload } = decodeBinary(new Uint8Array(e.data));
        this.emitEnvelope(header, payload, false);
      }
    };
    this.ws.onclose = (e) => this.emitClose({ code: e.code || 1006, reason: e.reason || "" });
  }

  send(envelope) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(envelope));
  }

  sendBinary(header, payload) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(encodeBinary(header, payload));
  }

  close(code, reason) {
    try {
      this.ws.close(code, reason);
    } catch {
      this.ws.close();
    }
  }
}

class WebTransportTransport extends Transport {
  name = "webtransport";

  constructor(url, hashes) {
    super();
    const options = hashes ? { serverCertificateHashes: hashes } : {};
    this.wt = new WebTransport(url, options);
    this.closeFrame = null;
    this.writer = null;
    this.opened = this.#open();
    this.wt.closed.then(
      (info) => this.#end(info?.closeCode ?? 1006, info?.reason ?? ""),
      () => this.#end(1006, "connection lost"),
    );
  }

  async #open() {
    await this.wt.ready;
    const stream = await this.wt.createBidirectionalStream();
    this.writer = stream.writable.getWriter();
    this.writer.write(encodeFrame(0, encoder.encode('{"type":"hello"}'))).catch(() => {});
    this.#read(stream.readable.getReader());
    this.#readDatagrams();
  }

  async #read(reader) {
    const frames = new FrameReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const f of frames.push(value)) {
          if (f.kind === 0) {
            const envelope = JSON.parse(decoder.decode(f.payload));
            if (envelope.type === "close") this.closeFrame = envelope;
            else this.emitEnvelope(envelope, null, false);
          } else {
            const { header, payload } = decodeBinary(f.payload);
            this.emitEnvelope(header, payload, false);
          }
        }
      }
    } catch {
      // The session ended; `closed` reports it.
    }
    this.wt.close();
  }

  async #readDatagrams() {
    try {
      const reader = this.wt.datagrams.readable.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        this.emitEnvelope(JSON.parse(decoder.decode(value)), null, true);
      }
    } catch {
      // Ends with the session.
    }
  }

  #end(code, reason) {
    // Browsers do not reliably surface the session's close code: the `close` envelope does.
    const frame = this.closeFrame;
    this.emitClose(frame ? { code: frame.code, reason: frame.reason } : { code, reason });
  }

  send(envelope) {
    this.writer?.write(encodeFrame(0, encoder.encode(JSON.stringify(envelope)))).catch(() => {});
  }

  sendBinary(header, payload) {
    this.writer?.write(encodeFrame(1, encodeBinary(header, payload))).catch(() => {});
  }

  close(code, reason) {
    try {
      this.wt.close({ closeCode: code, reason });
    } catch {
      // Already closed.
    }
  }
}

// ---------------------------------------------------------------------------------------
// The client.

/** Connects to the gateway endpoint at `url`; see client.d.ts for the options. */
export function connect(url, options = {}) {
  return new Client(url, options);
}

class Client {
  #options;
  #urls;
  #listeners = new Map();
  #requests = new Requests();
  #rooms = new RoomTracker();
  #handlers = new Map();
  /** The session in use: `{ transport, welcome, ids }` (ids: requests sent on it). */
  #session = null;
  /** Requests waiting for a session: functions that send them once there is one. */
  #queue = [];
  #closed = false;
  #attempt = 0;
  #fellBack = false;
  /** Why the last WebTransport attempt failed (the reason of a remembered fallback). */
  #lastReason = null;
  #lastTransport = null;
  #reconnectAfter = null;
  #reconnectUrl = null;
  #timers = new Set();
  #probing = false;
  #liveness = null;

  /** Counters for diagnostics: frames and datagrams received. */
  stats = { envelopes: 0, datagrams: 0 };

  constructor(url, options) {
    this.#options = {
      ...DEFAULTS,
      ...options,
      reconnect: { ...DEFAULTS.reconnect, ...(options.reconnect || {}) },
    };
    this.#urls = transportUrls(url, options.urls || {});
    this.#start();
  }

  /** The transport of the session in use, or `null` between sessions. */
  get transport() {
    return this.#session ? this.#session.transport.name : null;
  }

  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return this;
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
    return this;
  }

  #emit(event, detail) {
    for (const listener of this.#listeners.get(event) || []) {
      try {
        listener(detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  join(room, handler) {
    // Tracked as the ack is read, before any message that follows it in the same chunk.
    return this.#request({ type: "join", room }, "join", undefined, (ack) => {
      if (handler) this.#handlers.set(room, handler);
      this.#rooms.joined(room, ack);
    });
  }

  publish(room, data, { echo = false, volatile = false } = {}) {
    return this.#request({ type: "publish", room, echo, volatile }, "publish", data);
  }

  send(user, data) {
    return this.#request({ type: "send", to: user }, "send", data);
  }

  presence(room) {
    return this.#request({ type: "presence", room }, "presence");
  }

  async leave(room) {
    this.#rooms.left(room);
    this.#handlers.delete(room);
    return this.#request({ type: "leave", room }, "leave");
  }

  close() {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    this.#stopLiveness();
    const closed = clientError("closed", "the client was closed");
    this.#requests.failAll(closed);
    for (const q of this.#queue.splice(0)) q.fail(closed);
    const session = this.#session;
    this.#session = null;
    if (session) {
      session.transport.mute();
      session.transport.close(1000, "closed by client");
      this.#emit("close", { code: 1000, reason: "closed by client", willReconnect: false });
    }
  }

  // --- requests ---------------------------------------------------------------------

  #request(envelope, label, data, onAck) {
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(clientError("closed", "the client was closed"));
      const settle = (ack) => {
        onAck?.(ack);
        resolve(ack);
      };
      const send = (session) => {
        const id = this.#requests.open(settle, reject, this.#options.requestTimeoutMs, label);
        session.ids.add(id);
        const out = { ...envelope, id };
        if (data === undefined) session.transport.send(out);
        else if (isBinary(data)) session.transport.sendBinary(out, data);
        else session.transport.send({ ...out, data });
      };
      if (this.#session) return send(this.#session);
      if (this.#queue.length >= this.#options.maxQueuedRequests) {
        return reject(clientError("limit_exceeded", "too many requests waiting for a connection"));
      }
      // Waits (bounded) for the next session.
      const entry = { send, fail: reject };
      const timer = this.#timer(() => {
        const at = this.#queue.indexOf(entry);
        if (at >= 0) {
          this.#queue.splice(at, 1);
          reject(clientError("timeout", `${label} timed out waiting for a connection`));
        }
      }, this.#options.requestTimeoutMs);
      entry.send = (session) => {
        clearTimeout(timer);
        this.#timers.delete(timer);
        send(session);
      };
      this.#queue.push(entry);
    });
  }

  #timer(fn, ms) {
    const t = setTimeout(() => {
      this.#timers.delete(t);
      fn();
    }, ms);
    this.#timers.add(t);
    return t;
  }

  // --- connecting -------------------------------------------------------------------

  async #credential() {
    if (this.#options.getTicket) return { kind: "ticket", value: await this.#options.getTicket() };
    if (this.#options.token) return { kind: "token", value: this.#options.token };
    return null;
  }

  #wantsWebTransport() {
    return this.#options.transports.includes("webtransport");
  }

  /** Opens a WebTransport session within the timeout, or says why not. */
  async #openWebTransport(url) {
    if (typeof WebTransport === "undefined") return { reason: "unsupported" };
    let transport;
    try {
      transport = new WebTransportTransport(
        withCredential(url, await this.#credential()),
        this.#options.serverCertificateHashes,
      );
    } catch {
      return { reason: "refused" };
    }
    let timer;
    const timeout = new Promise((resolve) => {
      timer = setTimeout(() => resolve("timeout"), this.#options.webtransportTimeoutMs);
    });
    const outcome = await Promise.race([
      transport.opened.then(
        () => "open",
        () => "refused",
      ),
      timeout,
    ]);
    clearTimeout(timer);
    if (outcome === "open") return { transport };
    transport.mute();
    transport.close(1000, outcome);
    return { reason: outcome };
  }

  async #openWebSocket(url) {
    const transport = new WebSocketTransport(withCredential(url, await this.#credential()));
    try {
      await transport.opened;
      return { transport };
    } catch {
      return { reason: "refused" };
    }
  }

  /** One connection attempt: the preferred transport, then the fallback. */
  async #attemptSession() {
    const order = this.#options.transports;
    let reason = "preferred";
    for (const name of order) {
      if (name === "webtransport") {
        if (this.#fellBack && order.includes("websocket")) {
          // Remembered: do not wait on a blocked path again (the re-probe moves back up).
          reason = this.#lastReason ?? reason;
          continue;
        }
        const r = await this.#openWebTransport(this.#reconnectUrlFor("webtransport"));
        if (r.transport) return { transport: r.transport, reason: "preferred" };
        reason = r.reason;
        this.#lastReason = r.reason;
        if (order.includes("websocket")) this.#fellBack = true;
      } else if (name === "websocket") {
        const r = await this.#openWebSocket(this.#reconnectUrlFor("websocket"));
        if (r.transport) return { transport: r.transport, reason };
      }
    }
    return null;
  }

  #reconnectUrlFor(kind) {
    if (!this.#reconnectUrl) return this.#urls[kind];
    return transportUrls(this.#reconnectUrl)[kind];
  }

  /** One connection attempt; on failure, the next one after a backoff. */
  async #start() {
    if (this.#closed) return;
    const opened = await this.#attemptSession().catch(() => null);
    if (this.#closed) {
      opened?.transport.close(1000, "closed by client");
      return;
    }
    if (!opened) return this.#scheduleRetry(1006);
    const adopted = await this.#adopt(opened.transport, opened.reason);
    if (adopted.session) return;
    // Closed before `welcome`: the close code decides, as for a session that ended.
    this.#afterClose(adopted.close, false);
  }

  /**
   * Waits for `welcome` on a new transport; resolves `{ session }` (made the session in
   * use unless `reprobe`), or `{ close }` when the transport ended first.
   */
  #adopt(transport, reason, { reprobe = false } = {}) {
    return new Promise((resolve) => {
      const session = { transport, welcome: null, ids: new Set(), lastRx: Date.now() };
      let settled = false;
      // A session that never says `welcome` is given up (and retried).
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        transport.mute();
        transport.close(1000, "no welcome");
        resolve({ close: { code: 1006, reason: "no welcome from the server" } });
      }, WELCOME_TIMEOUT_MS);
      transport.listen(
        (envelope, payload, datagram) => {
          session.lastRx = Date.now();
          if (!session.welcome) {
            if (envelope.type === "welcome" && !settled) {
              session.welcome = envelope;
              settled = true;
              clearTimeout(timer);
              if (!reprobe) this.#activate(session, reason);
              resolve({ session });
            }
            return;
          }
          this.#dispatch(session, envelope, payload, datagram);
        },
        (info) => {
          if (!settled) {
            settled = true;
            clearTimeout(timer);
            resolve({ close: info });
            return;
          }
          this.#ended(session, info);
        },
      );
    });
  }

  #activate(session, reason, rejoin = true) {
    this.#session = session;
    this.#attempt = 0;
    this.#reconnectAfter = null;
    this.#reconnectUrl = null;
    const name = session.transport.name;
    if (name !== this.#lastTransport) {
      this.#lastTransport = name;
      this.#emit("transport", { transport: name, reason });
    }
    const w = session.welcome;
    this.#emit("open", { transport: name, session: w.session, user: w.user, node: w.node });
    if (rejoin) this.#rejoin(session);
    for (const q of this.#queue.splice(0)) q.send(session);
    this.#startLiveness(session);
    this.#scheduleReprobe();
  }

  /**
   * Joins every tracked room on `session` with `since`; returns the acks' promises. On a
   * re-probe the old session still delivers, so an unrecovered room with the same epoch
   * is caught up by it (see `#caughtUp`) rather than resynchronised.
   */
  #rejoin(session, reprobe = false) {
    return this.#rooms.rooms().map((room) => {
      const position = this.#rooms.position(room);
      return new Promise((resolve) => {
        const id = this.#requests.open(
          (ack) => {
            const continues = reprobe && ack.epoch === position.epoch;
            if (!continues && !this.#rooms.rejoined(room, ack)) this.#emit("resync", { room });
            resolve(ack);
          },
          () => resolve(null),
          this.#options.requestTimeoutMs,
          "rejoin",
        );
        session.ids.add(id);
        const envelope = { type: "join", room, id, since: position.since };
        if (position.epoch) envelope.epoch = position.epoch;
        session.transport.send(envelope);
      });
    });
  }

  #dispatch(session, envelope, payload, datagram) {
    this.stats.envelopes++;
    if (datagram) this.stats.datagrams++;
    switch (envelope.type) {
      case "ack":
      case "error":
      case "pong":
        if (envelope.id !== undefined) {
          session.ids.delete(envelope.id);
          this.#requests.settle(envelope);
        }
        return;
      case "message": {
        // During a re-probe both sessions deliver: volatile messages only from the one in use.
        const seq = envelope.seq;
        if ((seq === undefined || seq === null) && session !== this.#session) return;
        if (!this.#rooms.accept(envelope.room, seq)) return;
        const msg = { room: envelope.room, from: envelope.from, seq, data: payload ?? envelope.data };
        if (envelope.volatile) msg.volatile = true;
        this.#handlers.get(envelope.room)?.(msg);
        return;
      }
      case "direct":
        if (session !== this.#session) return;
        this.#emit("direct", { from: envelope.from, data: payload ?? envelope.data });
        return;
      case "presence":
        if (session !== this.#session) return;
        this.#emit("presence", { room: envelope.room, event: envelope.event, user: envelope.user });
        return;
      case "reconnect":
        if (session !== this.#session) return;
        this.#reconnectAfter = envelope.after_ms ?? 0;
        this.#reconnectUrl = envelope.url ?? null;
        return;
      default:
    }
  }

  /** A session in use ended: report it and reconnect unless the code says otherwise. */
  #ended(session, { code, reason }) {
    session.closed = true;
    const current = session === this.#session;
    const lost = clientError("connection_lost", `the connection closed (${code})`);
    this.#requests.failAll(lost, [...session.ids]);
    if (!current) return;
    this.#session = null;
    this.#stopLiveness();
    if (this.#closed) return;
    this.#afterClose({ code, reason }, true);
  }

  /** Reconnects after a close, or stays closed when its code says so. */
  #afterClose({ code, reason }, hadSession) {
    const action = closeAction(code);
    const willReconnect =
      action === "reconnect" || (action === "reauth" && Boolean(this.#options.getTicket));
    if (hadSession || !willReconnect) this.#emit("close", { code, reason, willReconnect });
    if (!willReconnect) {
      this.#closed = true;
      for (const t of this.#timers) clearTimeout(t);
      this.#timers.clear();
      const closed = clientError("closed", `the connection closed (${code}) and stays closed`);
      for (const q of this.#queue.splice(0)) q.fail(closed);
      return;
    }
    this.#scheduleRetry(code);
  }

  #scheduleRetry(code) {
    if (this.#closed) return;
    const delayMs =
      this.#reconnectAfter ?? backoffDelay(this.#attempt, this.#options.reconnect);
    this.#reconnectAfter = null;
    this.#attempt++;
    this.#emit("reconnecting", { attempt: this.#attempt, delayMs, code });
    this.#timer(() => this.#start(), delayMs);
  }

  // --- liveness ---------------------------------------------------------------------

  #startLiveness(session) {
    this.#stopLiveness();
    const beat = session.welcome.heartbeat_ms || 25000;
    this.#liveness = setInterval(() => {
      const idle = Date.now() - session.lastRx;
      if (idle >= 2 * beat) {
        // No frame and no answer to `ping` for two heartbeats: the connection is lost.
        session.transport.mute();
        session.transport.close(4009, "heartbeat timeout");
        this.#ended(session, { code: 4009, reason: "heartbeat timeout (client)" });
      } else if (idle >= beat / 2) {
        session.transport.send({ type: "ping" });
      }
    }, Math.max(250, beat / 2));
  }

  #stopLiveness() {
    if (this.#liveness) clearInterval(this.#liveness);
    this.#liveness = null;
  }

  // --- moving back up to WebTransport -------------------------------------------------

  #scheduleReprobe() {
    const every = this.#options.reprobeMs;
    if (!every || this.transport !== "websocket" || !this.#wantsWebTransport()) return;
    if (typeof WebTransport === "undefined") return;
    this.#timer(() => this.#reprobe(), every);
  }

  async #reprobe() {
    if (this.#closed || this.#probing || this.transport !== "websocket") return;
    this.#probing = true;
    try {
      const r = await this.#openWebTransport(this.#urls.webtransport);
      if (!r.transport) return;
      if (this.#closed) return r.transport.close(1000, "closed by client");
      const session = await this.#adopt(r.transport, "reprobe", { reprobe: true });
      if (!session.session) return;
      const fresh = session.session;
      // Both sessions deliver meanwhile; the rooms' seq tracking drops what arrives twice.
      const acks = await Promise.all(this.#rejoin(fresh, true));
      await this.#caughtUp(acks);
      const old = this.#session;
      if (fresh.closed) return;
      if (!old || this.#closed) {
        fresh.transport.mute();
        fresh.transport.close(1000, "closed by client");
        return;
      }
      this.#fellBack = false;
      this.#activate(fresh, "reprobe", false);
      this.#retire(old);
    } finally {
      this.#probing = false;
      if (this.transport === "websocket") this.#scheduleReprobe();
    }
  }

  /** Waits (up to 2 s) until every room has reached the `seq` its new join reported. */
  async #caughtUp(acks) {
    const deadline = Date.now() + 2000;
    const behind = () =>
      acks.some((ack) => {
        if (!ack || ack.type !== "ack") return false;
        const p = this.#rooms.position(ack.room);
        return p && p.epoch === ack.epoch && p.since < ack.seq;
      });
    while (behind() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  }

  /** Closes a replaced session once its requests are answered (or after 2 s). */
  async #retire(old) {
    const deadline = Date.now() + 2000;
    while (old.ids.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    old.transport.mute();
    old.transport.close(1000, "moved to webtransport");
    this.#requests.failAll(clientError("connection_lost", "the old session closed"), [...old.ids]);
    this.#emit("close", { code: 1000, reason: "moved to webtransport", willReconnect: true });
  }
}
