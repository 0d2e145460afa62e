// Declarations of the gateway's browser client (client.js). Checked by hand against the
// implementation; the wire contract behind them is PROTOCOL.md.

/** The two transports, in the names the server uses. */
export type TransportName = "webtransport" | "websocket";

/** Why the client is on the transport it reports. */
export type TransportReason = "preferred" | "unsupported" | "timeout" | "refused" | "reprobe";

/** A certificate hash as WebTransport takes it (for short-lived self-signed certificates). */
export interface CertificateHash {
  algorithm: "sha-256";
  value: BufferSource;
}

export interface ConnectOptions {
  /** A JWT sent as `?token=` on every attempt. */
  token?: string;
  /**
   * Called for a fresh one-time ticket (sent as `?ticket=`) before every connection: each
   * transport tried in an attempt, and each re-probe. A rejection counts as a failed attempt.
   */
  getTicket?: () => Promise<string>;
  /** Transports to try, in order. Default `["webtransport", "websocket"]`. */
  transports?: TransportName[];
  /** Passed to `new WebTransport()` (development certificates). */
  serverCertificateHashes?: CertificateHash[];
  /** How long a WebTransport attempt may take before falling back. Default 3000. */
  webtransportTimeoutMs?: number;
  /** Overrides of the URLs derived from the first argument of `connect`. */
  urls?: { webtransport?: string; websocket?: string };
  /** Exponential backoff with full jitter. Default `{ minDelayMs: 250, maxDelayMs: 10000 }`. */
  reconnect?: { minDelayMs?: number; maxDelayMs?: number };
  /** While on WebSocket, try WebTransport again this often (0 = never). Default 300000. */
  reprobeMs?: number;
  /**
   * How long a request may wait for a connection, and then again for its reply (so a
   * request made while disconnected settles within twice this). Default 30000.
   */
  requestTimeoutMs?: number;
  /** Requests that may wait for a connection at once. Default 1000. */
  maxQueuedRequests?: number;
}

/** Data as the application passes it: binary travels as a binary envelope. */
export type Data = unknown | ArrayBuffer | ArrayBufferView;

/** A room message as a room handler receives it (binary data arrives as `Uint8Array`). */
export interface RoomMessage {
  room: string;
  from?: string;
  data: unknown | Uint8Array;
  /** Absent for volatile messages. */
  seq?: number;
  volatile?: true;
}

/** The server's `ack` envelope; fields depend on the request. */
export interface Ack {
  type: "ack";
  id: number;
  room?: string;
  seq?: number;
  epoch?: string;
  /** `join`: the room's session count; `presence`: the listed members. */
  members?: number | Member[];
  /** `presence`: how many members the room has, listed or not. */
  count?: number;
  /** `presence`: `members` was cut at the server's `max_presence_members`. */
  truncated?: true;
  recovered?: boolean;
  delivered?: boolean;
}

export interface Member {
  user: string;
  session: string;
  transport: TransportName;
}

/**
 * A rejected request: the server's `error` envelope, or one the client raises with code
 * `timeout`, `connection_lost` (the session ended before the reply), `closed` or
 * `limit_exceeded` (too many requests waiting for a connection).
 */
export interface ErrorEnvelope {
  type: "error";
  id?: number;
  code: string;
  message: string;
}

/**
 * The codes an `rpc` rejects with. From the server (PROTOCOL.md sections 4, 5 and 10):
 * `rejected` (the application's backend refused the call with a 4xx; `message` is its
 * `reason`), `unavailable` (the backend failed, timed out, is over `max_in_flight` or its
 * circuit is open: retry later), `not_found` (the endpoint has no `rpc` upstream),
 * `bad_request` (`method` empty or longer than 128 characters), `limit_exceeded` (8 rpc
 * calls of this session are already in flight), `rate_limited`, `unauthorized`. From the
 * client: `timeout` (no answer within `timeoutMs`), `connection_lost` (the session ended
 * before the answer; the call is not sent again), `closed` (the client was closed or stays
 * closed), and `limit_exceeded` (too many requests waiting for a connection).
 */
export type RpcErrorCode =
  | "rejected"
  | "unavailable"
  | "not_found"
  | "bad_request"
  | "limit_exceeded"
  | "rate_limited"
  | "unauthorized"
  | "timeout"
  | "connection_lost"
  | "closed"
  | (string & {});

/**
 * What `rpc` rejects with: an `Error` carrying the error's `code` and `message`, also shaped
 * like `ErrorEnvelope` (`type: "error"`, and `id` when the server answered).
 */
export class GatewayError extends Error {
  constructor(error: { code: string; message: string; id?: number });
  readonly name: "GatewayError";
  readonly type: "error";
  readonly code: RpcErrorCode;
  readonly id?: number;
}

export interface RpcOptions {
  /**
   * How long the call may take in all, waiting for a connection included, in milliseconds.
   * Default 10000. Then it rejects with `timeout`; a later answer is ignored.
   */
  timeoutMs?: number;
}

/** The `resync` event (see `ClientEvents.resync`). */
export type ResyncEvent =
  | { room: string; reason: "continuity" | "dropped" | "recovery"; epoch: string; seq: number }
  | { room: string; reason: "refused"; error: ErrorEnvelope };

export interface ClientEvents {
  /**
   * Every new session: the first, every reconnection, and a re-probe switch. `data` is the
   * `welcome`'s `data`: what the endpoint's `connect` upstream returned for this session
   * (absent when it returned none, or the endpoint has no `connect` upstream).
   */
  open: { transport: TransportName; session: string; user: string; node: string; data?: unknown };
  /** The first connection, and whenever the transport in use changes. */
  transport: { transport: TransportName; reason: TransportReason };
  /** Before each new attempt. */
  reconnecting: { attempt: number; delayMs: number; code: number };
  /** Every session that ends; `willReconnect` says whether the client goes on. */
  close: { code: number; reason: string; willReconnect: boolean };
  /**
   * The application's view of a room may miss messages; refresh it from its own source of
   * truth. `reason`:
   * - `continuity` (from the server): the room's sequence restarted in a new `epoch` (its
   *   backplane failed over or lost its data); the room stays joined;
   * - `dropped` (from the server): messages queued for this slow session were dropped
   *   (the room's `overflow = "drop_oldest"`); the room stays joined;
   * - `recovery`: a rejoin after a reconnection could not recover (`recovered: false`);
   * - `refused`: the room could not be joined again at all (`error`); it is no longer
   *   joined.
   * With `epoch` and `seq`, messages after `seq` in `epoch` follow, and the client's stored
   * position for the room (used to rejoin with `since` after a reconnection) is now there.
   */
  resync: ResyncEvent;
  direct: { from?: string; data: unknown | Uint8Array };
  presence: { room: string; event: "join" | "leave"; user: string };
}

export interface Client {
  on<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): Client;
  off<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): Client;
  /** Joins `room`; `handler` gets its messages in `seq` order, once, across reconnections. */
  join(room: string, handler?: (message: RoomMessage) => void): Promise<Ack>;
  /** Resolves with the ack (with `seq` unless volatile); rejects with the error envelope. */
  publish(room: string, data: Data, options?: { echo?: boolean; volatile?: boolean }): Promise<Ack>;
  send(user: string, data: Data): Promise<Ack>;
  presence(room: string): Promise<Ack>;
  /**
   * Calls the endpoint's `rpc` upstream with `method` (1-128 characters) and JSON `data`
   * (PROTOCOL.md sections 4 and 10). Resolves with the backend's answer (the `ack`'s
   * `data`); rejects with a `GatewayError` whose `code` is one of `RpcErrorCode`. Calls
   * overlap (the server runs up to 8 per session); one made while reconnecting waits for
   * the next session within `timeoutMs`; one in flight when its session ends rejects with
   * `connection_lost` and is never sent again (the backend may still have run it).
   */
  rpc<T = unknown>(method: string, data?: unknown, options?: RpcOptions): Promise<T>;
  /** Stops delivery to the room's handler at once; between sessions it resolves locally. */
  leave(room: string): Promise<Ack | { type: "ack"; room: string }>;
  /** The transport of the session in use, `null` between sessions. */
  readonly transport: TransportName | null;
  /** Envelopes received on sessions (after `welcome`), and how many came as datagrams. */
  readonly stats: { envelopes: number; datagrams: number };
  /**
   * Closes with 1000 (a `close` event with `willReconnect: false` when a session was open);
   * no reconnection; waiting requests reject with `closed`. Rejections of `join`,
   * `publish`, `send`, `presence` and `leave` are plain objects shaped like
   * `ErrorEnvelope`, not `Error` instances; `rpc` rejects with `GatewayError` instances.
   */
  close(): void;
}

/** Connects to the endpoint at `url` (`https://HOST:PORT/PATH`; `wss://` works too). */
export function connect(url: string, options?: ConnectOptions): Client;

/** Backoff delay of attempt `attempt` (0-based): uniform in [0, min(max, min * 2^attempt)]. */
export function backoffDelay(
  attempt: number,
  bounds: { minDelayMs: number; maxDelayMs: number },
  random?: () => number,
): number;

/** What a client does after close code `code`. */
export function closeAction(code: number): "stay" | "reauth" | "reconnect";

// Lower-level building blocks the client is made of (exported for tests and other clients).

/** A binary envelope: u16 header length, JSON header, payload. */
export function encodeBinary(header: object, payload: ArrayBuffer | ArrayBufferView): Uint8Array;
export function decodeBinary(bytes: Uint8Array): { header: any; payload: Uint8Array };
/** One WebTransport frame: kind (0 JSON, 1 binary), u32 big-endian length, payload. */
export function encodeFrame(kind: 0 | 1, payload: Uint8Array): Uint8Array;
export function isBinary(data: unknown): data is ArrayBuffer | ArrayBufferView;
export function transportUrls(
  url: string,
  overrides?: { webtransport?: string; websocket?: string },
): { webtransport: string; websocket: string };
export function clientError(code: string, message: string): ErrorEnvelope;

/** Reassembles WebTransport frames from stream chunks. */
export class FrameReader {
  push(chunk: Uint8Array): { kind: number; payload: Uint8Array }[];
}

/** Per-room `seq` and `epoch` tracking, for rejoins and deduplication. */
export class RoomTracker {
  joined(room: string, ack: { seq?: number; epoch?: string }): void;
  left(room: string): void;
  has(room: string): boolean;
  rooms(): string[];
  position(room: string): { since: number; epoch: string | null } | null;
  rejoined(room: string, ack: { seq?: number; epoch?: string; recovered?: boolean }): boolean;
  /** A `resync` frame: the position moves to (`epoch`, `seq`), never back within an epoch. */
  resynced(room: string, frame: { epoch?: string; seq?: number }): boolean;
  accept(room: string, seq: number | undefined | null): boolean;
}

/** Request ids and the promises waiting for their replies. */
export class Requests {
  open(
    resolve: (ack: any) => void,
    reject: (error: ErrorEnvelope) => void,
    timeoutMs: number,
    label: string,
  ): number;
  settle(envelope: { type: string; id?: number }): boolean;
  fail(id: number, error: ErrorEnvelope): void;
  failAll(error: ErrorEnvelope, ids?: number[]): void;
  readonly size: number;
}
