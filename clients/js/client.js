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

/** How long an `rpc` may take, waiting for a connection included, unless it says otherwise. */
const RPC_TIMEOUT_MS = 10000;

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

  /**
   * A `resync` frame (PROTOCOL.md sections 5 and 7): messages after `seq` in `epoch` follow,
   * so the position moves there, and a rejoin after a reconnection asks from it. Within
   * the same epoch it never moves back (during a re-probe the other session may already
   * have delivered past `seq`; going back would deliver those twice). Returns whether
   * `room` is tracked.
   */
  resynced(room, { epoch, seq }) {
    const r = this.#rooms.get(room);
    if (!r) return false;
    const at = typeof seq === "number" ? seq : 0;
    const e = epoch ?? r.epoch;
    if (e !== r.epoch) {
      r.epoch = e;
      r.seq = at;
    } else {
      r.seq = Math.max(r.seq, at);
    }
    return true;
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

/**
 * What `rpc` rejects with: an `Error` whose `code` and `message` are the server's `error`
 * envelope's (`rejected` with the backend's reason, `unavailable`, `not_found`,
 * `bad_request`, `limit_exceeded`...) or the client's own (`timeout`, `connection_lost`,
 * `closed`). It also has `type: "error"` (and `id` when it answered a request), so it is
 * shaped like the envelope the other requests reject with.
 */
export class GatewayError extends Error {
  constructor({ code, message, id }) {
    super(message);
    this.name = "GatewayError";
    this.type = "error";
    this.code = code;
    if (id !== undefined) this.id = id;
  }
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

/** A JSON envelope from bytes, or `null` when malformed (it is skipped). */
function parseJson(bytes) {
  try {
    const value = JSON.parse(decoder.decode(bytes));
    return value && typeof value === "object" ? value : null;
  } catch {
    return null;
  }
}

/** The envelope (and binary payload) of a frame, or `null` when malformed. */
function parseFrame({ kind, payload, text }) {
  try {
    if (kind === 0) {
      const envelope = text !== undefined ? JSON.parse(text) : parseJson(payload);
      return envelope && typeof envelope === "object" ? { envelope, payload: null } : null;
    }
    const { header, payload: data } = decodeBinary(payload);
    return { envelope: header, payload: data };
  } catch {
    return null;
  }
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
      const decoded =
        typeof e.data === "string"
          ? parseFrame({ kind: 0, text: e.data })
          : parseFrame({ kind: 1, payload: new Uint8Array(e.data) });
      if (decoded) this.emitEnvelope(decoded.envelope, decoded.payload, false);
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
    this.readDone = null;
    this.opened = this.#open();
    this.wt.closed.then(
      (info) => this.#end(info?.closeCode || 1006, info?.reason ?? ""),
      () => this.#end(1006, "connection lost"),
    );
  }

  async #open() {
    await this.wt.ready;
    const stream = await this.wt.createBidirectionalStream();
    this.writer = stream.writable.getWriter();
    this.writer.write(encodeFrame(0, encoder.encode('{"type":"hello"}'))).catch(() => {});
    this.readDone = this.#read(stream.readable.getReader());
    this.#readDatagrams();
  }

  async #read(reader) {
    const frames = new FrameReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const f of frames.push(value)) {
          const decoded = parseFrame(f);
          if (!decoded) continue;
          if (decoded.envelope.type === "close") this.closeFrame = decoded.envelope;
          else this.emitEnvelope(decoded.envelope, decoded.payload, false);
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
        const envelope = parseJson(value);
        if (envelope) this.emitEnvelope(envelope, null, true);
      }
    } catch {
      // Ends with the session.
    }
  }

  async #end(code, reason) {
    // Browsers do not reliably surface the session's close code: the `close` envelope does,
    // once the stream has been read to its end (or shortly after the session closed).
    if (this.readDone) {
      await Promise.race([this.readDone, new Promise((r) => setTimeout(r, 500))]);
    }
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

/** A session that lived this long resets the reconnection backoff. */
const STABLE_MS = 5000;

/** Connects to the gateway endpoint at `url`; see client.d.ts for the options. */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/** Calls an application callback; what it throws is reported, never breaks the client. */
function callSafely(fn, arg) {
  try {
    fn(arg);
  } catch (e) {
    // Reported like an uncaught error (the page's `error` event, the console).
    if (typeof globalThis.reportError === "function") globalThis.reportError(e);
    else
      setTimeout(() => {
        throw e;
      });
  }
}

class Client {
  #options;
  #urls;
  #listeners = new Map();
  #requests = new Requests();
  #rooms = new RoomTracker();
  #handlers = new Map();
  /** Per room, bumped by every join and leave: an ack answers only the latest join. */
  #generations = new Map();
  /**
   * The session in use: `{ transport, welcome, ids, openedAt, liveness }` (ids: requests
   * sent on it and not yet answered).
   */
  #session = null;
  /** A transport being connected or waiting for `welcome`. */
  #connecting = null;
  /** Requests waiting for a session: `{ send(session), fail(error) }`. */
  #queue = [];
  #closed = false;
  #attempt = 0;
  /** WebTransport failed and WebSocket worked: reconnections go straight to WebSocket. */
  #fellBack = false;
  /** Why that WebTransport attempt failed. */
  #lastReason = null;
  #lastTransport = null;
  #reconnectAfter = null;
  #reconnectUrl = null;
  #timers = new Set();
  #probing = false;
  #reprobeTimer = null;

  /** Envelopes received on sessions (after `welcome`), and how many came as datagrams. */
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
    for (const listener of this.#listeners.get(event) || []) callSafely(listener, detail);
  }

  join(room, handler) {
    const generation = this.#bump(room);
    // Tracked as the ack is read, before any message that follows it in the same chunk.
    return this.#request({ type: "join", room }, "join", undefined, (ack, carrier) => {
      if (this.#generations.get(room) !== generation) return; // left (or joined again) since
      if (handler) this.#handlers.set(room, handler);
      else this.#handlers.delete(room);
      this.#rooms.joined(room, ack);
      // Joined on a session that a re-probe has replaced meanwhile: join on the new one too.
      const current = this.#session;
      if (current && current !== carrier) this.#rejoin(current, false, [room]);
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

  /**
   * Calls the endpoint's `rpc` upstream (PROTOCOL.md sections 4 and 10): resolves with the
   * `ack`'s `data`, rejects with a `GatewayError`. `timeoutMs` (default 10 s) bounds the
   * whole call, waiting for a connection included. A call whose session ends before the
   * answer rejects with `connection_lost` and is not sent again.
   */
  rpc(method, data, { timeoutMs = RPC_TIMEOUT_MS } = {}) {
    if (isBinary(data)) {
      return Promise.reject(
        new GatewayError(clientError("bad_request", "rpc data is JSON; binary data is not carried")),
      );
    }
    const envelope = { type: "rpc", method };
    if (data !== undefined) envelope.data = data;
    return this.#request(envelope, `rpc ${method}`, undefined, undefined, {
      timeoutMs,
      overall: true,
    }).then(
      (ack) => ack.data,
      (error) => {
        throw error instanceof Error ? error : new GatewayError(error);
      },
    );
  }

  leave(room) {
    this.#bump(room);
    const wasTracked = this.#rooms.has(room);
    this.#rooms.left(room);
    this.#handlers.delete(room);
    // Between sessions the next one simply does not join it again.
    if (!this.#session && wasTracked) return Promise.resolve({ type: "ack", room });
    return this.#request({ type: "leave", room }, "leave");
  }

  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#clearTimers();
    const closed = clientError("closed", "the client was closed");
    this.#requests.failAll(closed);
    for (const q of this.#queue.splice(0)) q.fail(closed);
    if (this.#connecting) {
      this.#connecting.mute();
      this.#connecting.close(1000, "closed by client");
      this.#connecting = null;
    }
    const session = this.#session;
    this.#session = null;
    if (session) {
      this.#stopLiveness(session);
      session.transport.mute();
      session.transport.close(1000, "closed by client");
      this.#emit("close", { code: 1000, reason: "closed by client", willReconnect: false });
    }
  }

  #bump(room) {
    const next = (this.#generations.get(room) ?? 0) + 1;
    this.#generations.set(room, next);
    return next;
  }

  #clearTimers() {
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    this.#reprobeTimer = null;
  }

  // --- requests ---------------------------------------------------------------------

  /**
   * Sends a request now, or on the next session; `onAck(ack, session)` runs as it is read.
   * It may wait `timeoutMs` (default `requestTimeoutMs`) for a session and then as long
   * for its reply, or, with `overall`, `timeoutMs` for both together.
   */
  #request(envelope, label, data, onAck, { timeoutMs, overall = false } = {}) {
    const waitMs = timeoutMs ?? this.#options.requestTimeoutMs;
    const deadline = Date.now() + waitMs;
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(clientError("closed", "the client was closed"));
      const send = (session) => {
        const settle = (ack) => {
          onAck?.(ack, session);
          resolve(ack);
        };
        const replyMs = overall ? Math.max(1, deadline - Date.now()) : waitMs;
        const id = this.#requests.open(settle, reject, replyMs, label);
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
      // Waits (at most requestTimeoutMs) for the next session.
      const entry = { fail: reject };
      const timer = this.#timer(() => {
        const at = this.#queue.indexOf(entry);
        if (at >= 0) {
          this.#queue.splice(at, 1);
          reject(clientError("timeout", `${label} timed out waiting for a connection`));
        }
      }, waitMs);
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

  /** A credential for one attempt (a fresh ticket each time); throws what `getTicket` throws. */
  async #credential() {
    if (this.#options.getTicket) return { kind: "ticket", value: await this.#options.getTicket() };
    if (this.#options.token) return { kind: "token", value: this.#options.token };
    return null;
  }

  #wantsWebTransport() {
    return this.#options.transports.includes("webtransport");
  }

  /** Opens a WebTransport session within the timeout, or says why not. */
  async #openWebTransport(url, credential) {
    if (typeof WebTransport === "undefined") return { reason: "unsupported" };
    let transport;
    try {
      transport = new WebTransportTransport(
        withCredential(url, credential),
        this.#options.serverCertificateHashes,
      );
    } catch {
      return { reason: "refused" };
    }
    this.#connecting = transport;
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
    if (outcome === "open" && !this.#closed) return { transport };
    transport.mute();
    transport.close(1000, outcome);
    return { reason: outcome };
  }

  async #openWebSocket(url, credential) {
    const transport = new WebSocketTransport(withCredential(url, credential));
    this.#connecting = transport;
    try {
      await transport.opened;
      return { transport };
    } catch {
      transport.mute();
      return { reason: "refused" };
    }
  }

  /** One connection attempt: the preferred transport, then the fallback. */
  async #attemptSession() {
    const order = this.#options.transports;
    // A `reconnect` frame's URL is for the next attempt only.
    const urls = this.#reconnectUrl ?? this.#urls;
    this.#reconnectUrl = null;
    let reason = "preferred";
    let webtransportFailed = false;
    for (const name of order) {
      if (this.#closed) return null;
      if (name === "webtransport") {
        if (this.#fellBack && order.includes("websocket")) {
          // Remembered: do not wait on a blocked path again (the re-probe moves back up).
          reason = this.#lastReason ?? reason;
          continue;
        }
        const r = await this.#openWebTransport(urls.webtransport, await this.#credential());
        if (r.transport) return { transport: r.transport, reason: "preferred" };
        reason = this.#lastReason = r.reason;
        webtransportFailed = true;
      } else if (name === "websocket") {
        const r = await this.#openWebSocket(urls.websocket, await this.#credential());
        if (r.transport) {
          if (webtransportFailed) this.#fellBack = true;
          return { transport: r.transport, reason };
        }
        // WebSocket failed too: the next attempt tries WebTransport again.
        this.#fellBack = false;
      }
    }
    return null;
  }

  /** One connection attempt; on failure, the next one after a backoff. */
  async #start() {
    if (this.#closed) return;
    let opened = null;
    try {
      opened = await this.#attemptSession();
    } catch {
      // `getTicket` failed: retried like a failed connection.
    }
    if (this.#closed) {
      opened?.transport.mute();
      opened?.transport.close(1000, "closed by client");
      return;
    }
    if (!opened) return this.#scheduleRetry(1006);
    const adopted = await this.#adopt(opened.transport, opened.reason);
    if (adopted.session || this.#closed) return;
    // Closed before `welcome`: the close code decides, as for a session that ended.
    this.#afterClose(adopted.close, false);
  }

  /**
   * Waits for `welcome` on a new transport; resolves `{ session }` (made the session in
   * use unless `reprobe`), or `{ close }` when the transport ended first.
   */
  #adopt(transport, reason, { reprobe = false } = {}) {
    this.#connecting = transport;
    return new Promise((resolve) => {
      const session = { transport, welcome: null, ids: new Set(), lastRx: Date.now() };
      let settled = false;
      const finish = (result) => {
        settled = true;
        clearTimeout(timer);
        if (this.#connecting === transport) this.#connecting = null;
        resolve(result);
      };
      // A session that never says `welcome` is given up (and retried).
      const timer = setTimeout(() => {
        if (settled) return;
        transport.mute();
        transport.close(1000, "no welcome");
        finish({ close: { code: 1006, reason: "no welcome from the server" } });
      }, WELCOME_TIMEOUT_MS);
      transport.listen(
        (envelope, payload, datagram) => {
          session.lastRx = Date.now();
          if (session.welcome) return this.#dispatch(session, envelope, payload, datagram);
          if (envelope.type !== "welcome" || settled) return;
          session.welcome = envelope;
          session.openedAt = Date.now();
          if (this.#closed) {
            transport.mute();
            transport.close(1000, "closed by client");
            return finish({ close: { code: 1000, reason: "closed by client" } });
          }
          finish({ session });
          if (!reprobe) this.#activate(session, reason);
        },
        (info) => {
          if (!settled) return finish({ close: info });
          this.#ended(session, info);
        },
      );
    });
  }

  /** Makes `session` the one in use (rejoining every room unless a re-probe did). */
  #activate(session, reason, rejoin = true) {
    this.#session = session;
    this.#reconnectAfter = null;
    const name = session.transport.name;
    this.#startLiveness(session);
    if (name !== this.#lastTransport) {
      this.#lastTransport = name;
      this.#emit("transport", { transport: name, reason });
      if (this.#session !== session) return; // closed by a listener
    }
    const w = session.welcome;
    const open = { transport: name, session: w.session, user: w.user, node: w.node };
    // What the endpoint's `connect` upstream returned for this session, when it did.
    if (w.data !== undefined) open.data = w.data;
    this.#emit("open", open);
    if (this.#session !== session) return;
    if (rejoin) this.#rejoin(session);
    for (const q of this.#queue.splice(0)) q.send(session);
    this.#scheduleReprobe();
  }

  /**
   * Joins `rooms` (every tracked room by default) on `session` with `since`; returns the
   * acks' promises (`null` for a failed rejoin). On a re-probe the old session still
   * delivers, so an unrecovered room with the same epoch is caught up by it (see
   * `#caughtUp`) rather than resynchronised.
   */
  #rejoin(session, reprobe = false, rooms = this.#rooms.rooms()) {
    return rooms.map((room) => {
      const position = this.#rooms.position(room);
      const generation = this.#generations.get(room);
      return new Promise((resolve) => {
        const current = () => this.#generations.get(room) === generation;
        const id = this.#requests.open(
          (ack) => {
            if (current()) {
              const continues = reprobe && ack.epoch === position.epoch;
              if (!continues && !this.#rooms.rejoined(room, ack)) {
                this.#emit("resync", { room, reason: "recovery", epoch: ack.epoch, seq: ack.seq ?? 0 });
              }
            }
            resolve(ack);
          },
          (error) => {
            // Refused (forbidden, limit...) or unanswered: the room is no longer joined.
            if (current() && !reprobe && error.code !== "connection_lost" && error.code !== "closed") {
              this.#rooms.left(room);
              this.#handlers.delete(room);
              this.#emit("resync", { room, reason: "refused", error });
            }
            resolve(null);
          },
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
        const volatile = seq === undefined || seq === null;
        if (volatile && session !== this.#session) return;
        if (!this.#rooms.accept(envelope.room, seq)) return;
        const msg = { room: envelope.room, from: envelope.from, data: payload ?? envelope.data };
        if (!volatile) msg.seq = seq;
        if (envelope.volatile) msg.volatile = true;
        const handler = this.#handlers.get(envelope.room);
        if (handler) callSafely(handler, msg);
        return;
      }
      case "direct":
        if (session !== this.#session) return;
        this.#emit("direct", { from: envelope.from, data: payload ?? envelope.data });
        return;
      case "resync": {
        // The room stays joined but messages were skipped (its sequence restarted, or this
        // slow session's queue dropped some). During a re-probe both sessions get it: the
        // one in use reports it (the other's messages are deduplicated against it).
        if (session !== this.#session) return;
        const { room, epoch, seq, reason } = envelope;
        if (!this.#rooms.resynced(room, { epoch, seq })) return;
        this.#emit("resync", { room, reason, epoch, seq });
        return;
      }
      case "presence":
        if (session !== this.#session) return;
        this.#emit("presence", { room: envelope.room, event: envelope.event, user: envelope.user });
        return;
      case "reconnect":
        if (session !== this.#session) return;
        this.#reconnectAfter = envelope.after_ms ?? 0;
        this.#reconnectUrl = null;
        if (envelope.url) {
          try {
            const base = this.#urls.webtransport;
            this.#reconnectUrl = transportUrls(new URL(envelope.url, base).toString());
          } catch {
            // Not a URL: reconnect where we were.
          }
        }
        return;
      default:
    }
  }

  /** A session ended: report it and reconnect unless the code says otherwise. */
  #ended(session, { code, reason }) {
    session.closed = true;
    this.#stopLiveness(session);
    const current = session === this.#session;
    const lost = clientError("connection_lost", `the connection closed (${code})`);
    this.#requests.failAll(lost, [...session.ids]);
    if (!current) return;
    this.#session = null;
    if (this.#closed) return;
    // A session that did not last does not reset the backoff.
    if (Date.now() - session.openedAt >= STABLE_MS) this.#attempt = 0;
    this.#afterClose({ code, reason }, true);
  }

  /** Reconnects after a close, or stays closed when its code says so. */
  #afterClose({ code, reason }, hadSession) {
    const action = closeAction(code);
    const willReconnect =
      action === "reconnect" || (action === "reauth" && Boolean(this.#options.getTicket));
    if (hadSession || !willReconnect) this.#emit("close", { code, reason, willReconnect });
    if (this.#closed) return;
    if (!willReconnect) {
      this.#closed = true;
      this.#clearTimers();
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
    if (this.#closed) return;
    this.#timer(() => this.#start(), delayMs);
  }

  // --- liveness ---------------------------------------------------------------------

  #startLiveness(session) {
    const beat = session.welcome.heartbeat_ms || 25000;
    session.liveness = setInterval(() => {
      if (session.closed || this.#closed) return this.#stopLiveness(session);
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

  #stopLiveness(session) {
    if (session.liveness) clearInterval(session.liveness);
    session.liveness = null;
  }

  // --- moving back up to WebTransport -------------------------------------------------

  #scheduleReprobe() {
    const every = this.#options.reprobeMs;
    if (this.#reprobeTimer) {
      clearTimeout(this.#reprobeTimer);
      this.#timers.delete(this.#reprobeTimer);
      this.#reprobeTimer = null;
    }
    if (!every || this.transport !== "websocket" || !this.#wantsWebTransport()) return;
    if (typeof WebTransport === "undefined") return;
    this.#reprobeTimer = this.#timer(() => {
      this.#reprobeTimer = null;
      this.#reprobe();
    }, every);
  }

  async #reprobe() {
    if (this.#closed || this.#probing || this.transport !== "websocket") return;
    this.#probing = true;
    try {
      let r;
      try {
        r = await this.#openWebTransport(this.#urls.webtransport, await this.#credential());
      } catch {
        return; // `getTicket` failed: the next re-probe tries again
      }
      if (!r.transport) return;
      const adopted = await this.#adopt(r.transport, "reprobe", { reprobe: true });
      const fresh = adopted.session;
      if (!fresh) return;
      // Both sessions deliver meanwhile; the rooms' seq tracking drops what arrives twice.
      const rejoined = this.#rooms.rooms();
      const acks = await Promise.all(this.#rejoin(fresh, true, rejoined));
      await this.#caughtUp(acks);
      const old = this.#session;
      if (fresh.closed) return;
      if (this.#closed || !old || old.closed) {
        // The client closed, or the old session ended meanwhile (a retry is scheduled):
        // nothing to switch from; let the regular reconnection take over.
        fresh.transport.mute();
        fresh.transport.close(1000, "not needed");
        return;
      }
      // Rooms joined or left on the old session while the new one was joining.
      const now = new Set(this.#rooms.rooms());
      const missing = [...now].filter((room) => !rejoined.includes(room));
      for (const room of rejoined.filter((room) => !now.has(room))) {
        fresh.transport.send({ type: "leave", room });
      }
      this.#fellBack = false;
      this.#activate(fresh, "reprobe", false);
      if (missing.length) this.#rejoin(fresh, false, missing);
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
    this.#stopLiveness(old);
    const deadline = Date.now() + 2000;
    while (old.ids.size > 0 && !old.closed && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    old.closed = true;
    old.transport.mute();
    old.transport.close(1000, "moved to webtransport");
    this.#requests.failAll(clientError("connection_lost", "the old session closed"), [...old.ids]);
    if (!this.#closed) {
      this.#emit("close", { code: 1000, reason: "moved to webtransport", willReconnect: true });
    }
  }
}
