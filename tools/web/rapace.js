// rapace.js: a rapace v1 client for browsers, over WebSocket (wire protocol spec 8.2).
// An ES module with no dependencies and no build step:
//
//   import { RapaceClient, Writer, Reader } from "./rapace.js";
//   const client = await RapaceClient.connect("ws://127.0.0.1:8080/");
//   const sum = await client.call("Echo", "add",
//       (w) => { w.i32(2); w.i32(3); }, (r) => r.i32());
//   for await (const n of client.stream("Echo", "countdown", (w) => w.u32(3), (r) => r.u32())) { … }
//   client.close();
//
// Failed calls reject with a RapaceError carrying the status `code` (spec 7).
// See Docs/browser-tools.md for the whole API.

/** Frame flags (spec 1.2). */
export const Flags = Object.freeze({
  DATA: 0x1, CONTROL: 0x2, EOS: 0x4, ERROR: 0x10, HIGH_PRIORITY: 0x20,
  CREDITS: 0x40, NO_REPLY: 0x100, RESPONSE: 0x200,
});

/** Status codes (spec 7): name → number. */
export const StatusCode = Object.freeze({
  OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5, ALREADY_EXISTS: 6, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9, ABORTED: 10, OUT_OF_RANGE: 11, UNIMPLEMENTED: 12,
  INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16,
  INCOMPATIBLE_SCHEMA: 17, PROTOCOL_ERROR: 50, INVALID_FRAME: 51,
  INVALID_CHANNEL: 52, INVALID_METHOD: 53, DECODE_ERROR: 54, ENCODE_ERROR: 55,
});

const statusNames = Object.fromEntries(Object.entries(StatusCode).map(([k, v]) => [v, k]));

/** A failed call: `code` is the numeric status, `codeName` its name (or "APP_<n>"). */
export class RapaceError extends Error {
  /**
   * @param {number} code status code
   * @param {string} message
   * @param {Uint8Array} [details]
   */
  constructor(code, message, details = new Uint8Array(0)) {
    super(message);
    this.name = "RapaceError";
    this.code = code;
    this.codeName = statusNames[code] ?? `APP_${code}`;
    this.details = details;
  }
}

const VERB = { HELLO: 0, OPEN_CHANNEL: 1, CLOSE_CHANNEL: 2, CANCEL_CHANNEL: 3, GRANT_CREDITS: 4, PING: 5, PONG: 6, GO_AWAY: 7 };
const PROTOCOL_VERSION = 0x00010000;
const U32_MAX = 0xffffffff;
const NO_DEADLINE = 0xffffffffffffffffn;
const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

// ---------------------------------------------------------------------------------------
// Postcard (spec 3)

/** Postcard encoder: call the typed methods in field order, then `bytes()`. */
export class Writer {
  constructor() { this.buf = new Uint8Array(64); this.len = 0; }
  #reserve(n) {
    if (this.len + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }
  /** One raw byte. */
  u8(v) { this.#reserve(1); this.buf[this.len++] = v & 0xff; return this; }
  /** Unsigned LEB128 varint of a number or BigInt (up to 64 bits). */
  varint(v) {
    let x = BigInt(v);
    if (x < 0n || x > 0xffffffffffffffffn) throw new RangeError(`varint out of range: ${v}`);
    do {
      let byte = Number(x & 0x7fn);
      x >>= 7n;
      if (x !== 0n) byte |= 0x80;
      this.u8(byte);
    } while (x !== 0n);
    return this;
  }
  /** u16/u32: varint. */
  u32(v) { if (!Number.isInteger(v) || v < 0 || v > U32_MAX) throw new RangeError(`u32 out of range: ${v}`); return this.varint(v); }
  /** u64 (number or BigInt): varint. */
  u64(v) { return this.varint(v); }
  /** i32: zigzag + varint. */
  i32(v) { if (!Number.isInteger(v) || v < -0x80000000 || v > 0x7fffffff) throw new RangeError(`i32 out of range: ${v}`); return this.i64(v); }
  /** i64 (number or BigInt): zigzag + varint. */
  i64(v) { const x = BigInt(v); return this.varint(x >= 0n ? x << 1n : ((-x) << 1n) - 1n); }
  bool(v) { return this.u8(v ? 1 : 0); }
  f32(v) { this.#reserve(4); new DataView(this.buf.buffer).setFloat32(this.len, v, true); this.len += 4; return this; }
  f64(v) { this.#reserve(8); new DataView(this.buf.buffer).setFloat64(this.len, v, true); this.len += 8; return this; }
  /** Raw bytes without a length (fixed-size arrays). */
  raw(bytes) { this.#reserve(bytes.length); this.buf.set(bytes, this.len); this.len += bytes.length; return this; }
  /** Byte buffer: varint length + bytes. */
  byteArray(bytes) { return this.varint(bytes.length).raw(bytes); }
  /** String: varint length + UTF-8. */
  string(s) { return this.byteArray(textEncoder.encode(s)); }
  /** Optional: 00, or 01 + `write(this, value)`. */
  option(value, write) { if (value === null || value === undefined) return this.u8(0); this.u8(1); write(this, value); return this; }
  /** Array: varint count + `write(this, element)` each. */
  array(values, write) { this.varint(values.length); for (const v of values) write(this, v); return this; }
  /** The encoded bytes. */
  bytes() { return this.buf.slice(0, this.len); }
}

/** Postcard decoder over a Uint8Array; call `end()` to reject trailing bytes. */
export class Reader {
  /** @param {Uint8Array} bytes */
  constructor(bytes) { this.bytes = bytes; this.pos = 0; }
  #need(n) { if (this.pos + n > this.bytes.length) throw new RapaceError(StatusCode.DECODE_ERROR, `postcard: need ${n} bytes at offset ${this.pos}`); }
  u8() { this.#need(1); return this.bytes[this.pos++]; }
  /** Unsigned varint as BigInt (at most 10 bytes, at most 64 bits). */
  varintBig() {
    let result = 0n, shift = 0n;
    for (let i = 0; i < 10; i++) {
      const b = this.u8();
      result |= BigInt(b & 0x7f) << shift;
      if ((b & 0x80) === 0) {
        if (result > 0xffffffffffffffffn) break;
        return result;
      }
      shift += 7n;
    }
    throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: bad varint");
  }
  /** u32 as a number. */
  u32() { const v = this.varintBig(); if (v > 0xffffffffn) throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: u32 too large"); return Number(v); }
  /** u64 as a BigInt. */
  u64() { return this.varintBig(); }
  /** i64 as a BigInt. */
  i64() { const z = this.varintBig(); return (z & 1n) ? -((z >> 1n) + 1n) : z >> 1n; }
  /** i32 as a number. */
  i32() { const v = this.i64(); if (v < -0x80000000n || v > 0x7fffffffn) throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: i32 out of range"); return Number(v); }
  bool() { const b = this.u8(); if (b > 1) throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: bad bool"); return b === 1; }
  f32() { this.#need(4); const v = new DataView(this.bytes.buffer, this.bytes.byteOffset).getFloat32(this.pos, true); this.pos += 4; return v; }
  f64() { this.#need(8); const v = new DataView(this.bytes.buffer, this.bytes.byteOffset).getFloat64(this.pos, true); this.pos += 8; return v; }
  raw(n) { this.#need(n); const v = this.bytes.slice(this.pos, this.pos + n); this.pos += n; return v; }
  byteArray() { return this.raw(this.u32()); }
  string() {
    try { return textDecoder.decode(this.byteArray()); } catch (e) {
      if (e instanceof RapaceError) throw e;
      throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: invalid UTF-8");
    }
  }
  option(read) { const tag = this.u8(); if (tag === 0) return null; if (tag === 1) return read(this); throw new RapaceError(StatusCode.DECODE_ERROR, "postcard: bad option tag"); }
  array(read) { const n = this.u32(); const out = []; for (let i = 0; i < n; i++) out.push(read(this)); return out; }
  /** Throws if bytes remain. */
  end() { if (this.pos !== this.bytes.length) throw new RapaceError(StatusCode.DECODE_ERROR, `postcard: ${this.bytes.length - this.pos} trailing bytes`); }
}

// ---------------------------------------------------------------------------------------
// Method ids (spec 2) and frames (spec 1, 8.2)

/** FNV-1a-64 of bytes, as a BigInt. */
export function fnv1a64(bytes) {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return h;
}

/**
 * lowerCamelCase → snake_case, the rule of spec 2 as rapace's Swift side applies it:
 * "getStatus" → "get_status", "parseURLQuickly" → "parse_url_quickly" (an acronym is one
 * word; an uppercase letter starts a word after a lowercase letter or a digit, or when it
 * ends an acronym, i.e. comes after an uppercase letter and before a lowercase one).
 */
export function snakeCase(name) {
  const chars = Array.from(name);
  const upper = (c) => c !== undefined && /\p{Lu}/u.test(c);
  const lower = (c) => c !== undefined && /\p{Ll}/u.test(c);
  const digit = (c) => c !== undefined && /\p{N}/u.test(c);
  let out = "";
  chars.forEach((c, i) => {
    if (!upper(c)) { out += c; return; }
    const previous = chars[i - 1], next = chars[i + 1];
    const startsWord = lower(previous) || digit(previous);
    const endsAcronym = upper(previous) && lower(next);
    if (i > 0 && (startsWord || endsAcronym)) out += "_";
    out += c.toLowerCase();
  });
  return out;
}

/** Method ids computed so far: service → (method as given → id); nested, since a dotted
 * service or method name could make one joined key stand for two pairs. */
const methodIds = new Map();

/**
 * The method id of `Service.method` (method given as written in Swift or snake_case).
 * Computed once per service and method (kept in `methodIds`): calls repeat them.
 */
export function methodId(service, method) {
  let ids = methodIds.get(service);
  if (ids === undefined) methodIds.set(service, ids = new Map());
  let id = ids.get(method);
  if (id === undefined) {
    const h = fnv1a64(textEncoder.encode(`${service}.${snakeCase(method)}`));
    id = Number(((h >> 32n) ^ h) & 0xffffffffn);
    ids.set(method, id);
  }
  return id;
}

/**
 * Encodes a frame as one WebSocket message: 64-byte descriptor + payload.
 * @param {{msgId:number|bigint, channelId:number, methodId:number, flags:number, creditGrant?:number, payload?:Uint8Array}} f
 */
export function encodeFrame(f) {
  const payload = f.payload ?? new Uint8Array(0);
  const out = new Uint8Array(64 + payload.length);
  const v = new DataView(out.buffer);
  v.setBigUint64(0, BigInt(f.msgId), true);
  v.setUint32(8, f.channelId, true);
  v.setUint32(12, f.methodId >>> 0, true);
  const inline = payload.length <= 16;
  v.setUint32(16, inline ? U32_MAX : 0, true);
  v.setUint32(28, payload.length, true);
  v.setUint32(32, f.flags, true);
  v.setUint32(36, f.creditGrant ?? 0, true);
  v.setBigUint64(40, NO_DEADLINE, true);
  if (inline) out.set(payload, 48);
  out.set(payload, 64);
  return out;
}

/** Decodes one WebSocket message into a frame; throws on a framing error (spec 8.2). */
export function decodeFrame(bytes) {
  if (bytes.length < 64) throw new RapaceError(StatusCode.INVALID_FRAME, `message of ${bytes.length} bytes is shorter than the descriptor`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const payloadLen = v.getUint32(28, true);
  if (payloadLen !== bytes.length - 64) throw new RapaceError(StatusCode.INVALID_FRAME, `payload_len ${payloadLen} differs from message length − 64`);
  return {
    msgId: v.getBigUint64(0, true), channelId: v.getUint32(8, true), methodId: v.getUint32(12, true),
    flags: v.getUint32(32, true), creditGrant: v.getUint32(36, true), payload: bytes.subarray(64),
  };
}

function readStatus(r) { return { code: r.u32(), message: r.string(), details: r.byteArray() }; }
function readPairs(r) { return r.array((x) => [x.string(), x.byteArray()]); }

/** Decodes a CallResult (spec 6.1): `{status, trailers, body}` (body: Uint8Array or null). */
export function decodeCallResult(bytes) {
  const r = new Reader(bytes);
  const status = readStatus(r);
  const trailers = readPairs(r);
  const body = r.option((x) => x.byteArray());
  r.end();
  return { status, trailers, body };
}

// ---------------------------------------------------------------------------------------
// The client

/**
 * A rapace session over one WebSocket, as the initiator (odd channel ids).
 * Create with `RapaceClient.connect(url)`.
 */
export class RapaceClient {
  #ws; #nextMsgId = 1; #nextChannel = 1; #channels = new Map(); #closed = null;
  /** The server's Hello: `{version, role, features, limits:{maxPayloadSize,maxChannels,maxPendingCalls}, methods:[{id,name}]}`. */
  serverHello = null;

  constructor(ws) { this.#ws = ws; }

  /**
   * Opens `url` (ws:// or wss://), exchanges Hello, resolves with a ready client.
   * @param {string} url
   * @param {{timeoutMs?: number}} [options] handshake time limit (default 5000)
   * @returns {Promise<RapaceClient>}
   */
  static connect(url, options = {}) {
    const timeoutMs = options.timeoutMs ?? 5000;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      const client = new RapaceClient(ws);
      let settled = false;
      const timer = setTimeout(() => { if (!settled) { settled = true; ws.close(); reject(new RapaceError(StatusCode.UNAVAILABLE, `no Hello from ${url} within ${timeoutMs} ms`)); } }, timeoutMs);
      client.onReady = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (error) reject(error); else resolve(client);
      };
      ws.onopen = () => client.#sendHello();
      ws.onmessage = (event) => client.#receive(event.data);
      ws.onerror = () => {};
      ws.onclose = (event) => client.#didClose(new RapaceError(StatusCode.UNAVAILABLE, `connection closed (${event.code}${event.reason ? ": " + event.reason : ""})`));
    });
  }

  /** Whether the connection has ended. */
  get isClosed() { return this.#closed !== null; }

  /** Closes the connection; pending calls fail with UNAVAILABLE. */
  close() {
    if (this.#closed) return;
    this.#ws.close(1000, "client closed");
    this.#didClose(new RapaceError(StatusCode.UNAVAILABLE, "client closed"));
  }

  /**
   * A unary call.
   * @param {string} service e.g. "Echo"
   * @param {string} method e.g. "add" (Swift base name; converted to snake_case)
   * @param {(w: Writer) => void} [writeArgs] writes the arguments in order
   * @param {(r: Reader) => any} [readResult] reads the return value (omit for Void)
   * @param {{timeoutMs?: number}} [options] deadline, sent as rapace.deadline_remaining_ms
   * @returns {Promise<any>} the decoded result; rejects with RapaceError
   */
  call(service, method, writeArgs, readResult, options = {}) {
    return new Promise((resolve, reject) => {
      this.#open(service, method, writeArgs, 0, U32_MAX, options, {
        result: (bytes) => {
          try {
            const r = new Reader(bytes);
            const value = readResult ? readResult(r) : undefined;
            r.end();
            resolve(value);
          } catch (e) { reject(e); }
        },
        fail: reject,
      });
    });
  }

  /**
   * A server-streaming call, as an async iterable of decoded items.
   * @param {string} service
   * @param {string} method
   * @param {(w: Writer) => void} [writeArgs]
   * @param {(r: Reader) => any} readItem reads one item
   * @param {{windowBytes?: number, timeoutMs?: number}} [options] credit window (default 65536)
   * @returns {AsyncIterable<any>} ends at the stream's end; throws RapaceError on failure
   */
  stream(service, method, writeArgs, readItem, options = {}) {
    const windowBytes = options.windowBytes ?? 65536;
    const queue = [];
    let waiter = null, finished = false, failure = null, consumed = 0, channelId = 0;
    const wake = () => { if (waiter) { const w = waiter; waiter = null; w(); } };
    const client = this;
    let started = false;
    const start = () => {
      started = true;
      channelId = this.#open(service, method, writeArgs, 1, windowBytes, options, {
        item: (bytes) => { queue.push(bytes); wake(); },
        result: () => { finished = true; wake(); },
        fail: (e) => { failure = e; finished = true; wake(); },
      });
    };
    return {
      [Symbol.asyncIterator]() {
        if (!started) start();
        return {
          async next() {
            for (;;) {
              if (queue.length > 0) {
                const bytes = queue.shift();
                consumed += bytes.length;
                if (consumed >= windowBytes / 2 && !finished) {
                  client.#control(VERB.GRANT_CREDITS, new Writer().u32(channelId).u32(consumed).bytes());
                  consumed = 0;
                }
                const r = new Reader(bytes);
                const value = readItem(r);
                r.end();
                return { value, done: false };
              }
              if (failure) throw failure;
              if (finished) return { value: undefined, done: true };
              await new Promise((resolve) => { waiter = resolve; });
            }
          },
          async return() {
            if (!finished) { finished = true; client.#cancel(channelId, 0); }
            return { value: undefined, done: true };
          },
        };
      },
    };
  }

  // --- internals

  #send(frame) {
    if (this.#closed) return;
    this.#ws.send(encodeFrame({ ...frame, msgId: this.#nextMsgId++ }));
  }

  #control(verb, payload) { this.#send({ channelId: 0, methodId: verb, flags: Flags.CONTROL, payload }); }

  #sendHello() {
    const w = new Writer();
    w.u32(PROTOCOL_VERSION).u8(0 /* initiator */).u64(0x2).u64(0xe);
    w.u32(16 << 20).u32(0).u32(0);  // limits
    w.varint(0).varint(0);  // methods, params
    this.#control(VERB.HELLO, w.bytes());
  }

  #cancel(channelId, reason) {
    if (!this.#channels.has(channelId)) return;
    this.#channels.delete(channelId);
    this.#control(VERB.CANCEL_CHANNEL, new Writer().u32(channelId).u8(reason).bytes());
  }

  #open(service, method, writeArgs, kind, credits, options, handlers) {
    if (this.#closed) { handlers.fail(this.#closed); return null; }
    const id = this.#nextChannel;
    this.#nextChannel += 2;
    let args;
    try { const w = new Writer(); if (writeArgs) writeArgs(w); args = w.bytes(); } catch (e) {
      handlers.fail(e instanceof RapaceError ? e : new RapaceError(StatusCode.ENCODE_ERROR, String(e)));
      return null;
    }
    const metadata = [];
    let timer = null;
    if (options.timeoutMs !== undefined) {
      const ms = new Uint8Array(4);
      new DataView(ms.buffer).setUint32(0, Math.max(0, Math.floor(options.timeoutMs)), true);
      metadata.push(["rapace.deadline_remaining_ms", ms]);
      timer = setTimeout(() => {
        if (!this.#channels.has(id)) return;
        this.#cancel(id, 1 /* deadlineExceeded */);
        handlers.fail(new RapaceError(StatusCode.DEADLINE_EXCEEDED, `${service}.${method} exceeded ${options.timeoutMs} ms`));
      }, options.timeoutMs);
    }
    const done = () => { if (timer) clearTimeout(timer); this.#channels.delete(id); };
    this.#channels.set(id, {
      item: handlers.item,
      result: (bytes) => { done(); handlers.result(bytes); },
      fail: (e) => { done(); handlers.fail(e); },
    });
    const open = new Writer().u32(id).u8(kind).u8(0 /* attach: none */)
      .array(metadata, (w, [k, v]) => { w.string(k); w.byteArray(v); }).u32(credits);
    this.#control(VERB.OPEN_CHANNEL, open.bytes());
    this.#send({ channelId: id, methodId: methodId(service, method), flags: Flags.DATA | Flags.EOS, payload: args });
    return id;
  }

  #receive(data) {
    let frame;
    try {
      if (typeof data === "string") throw new RapaceError(StatusCode.PROTOCOL_ERROR, "text message");
      frame = decodeFrame(new Uint8Array(data));
    } catch (e) {
      this.#ws.close(typeof data === "string" ? 1003 : 1002, "bad frame");
      this.#didClose(e);
      return;
    }
    try {
      if (frame.channelId === 0) this.#receiveControl(frame); else this.#receiveData(frame);
    } catch (e) {
      this.#ws.close(1002, "bad payload");
      this.#didClose(e instanceof RapaceError ? e : new RapaceError(StatusCode.PROTOCOL_ERROR, String(e)));
    }
  }

  #receiveControl(frame) {
    const r = new Reader(frame.payload);
    switch (frame.methodId) {
      case VERB.HELLO: {
        const version = r.u32(), role = r.u32(), required = r.u64(), supported = r.u64();
        const limits = { maxPayloadSize: r.u32(), maxChannels: r.u32(), maxPendingCalls: r.u32() };
        const methods = r.array((x) => ({ id: x.u32(), sigHash: x.raw(32), name: x.option((y) => y.string()) }));
        const params = readPairs(r);
        if (version >>> 16 !== PROTOCOL_VERSION >>> 16) throw new RapaceError(StatusCode.INCOMPATIBLE_SCHEMA, `server speaks protocol ${version.toString(16)}`);
        if (role !== 1) throw new RapaceError(StatusCode.PROTOCOL_ERROR, "server Hello is not from an acceptor");
        if ((required & ~0xen) !== 0n) throw new RapaceError(StatusCode.INCOMPATIBLE_SCHEMA, `server requires features ${required.toString(16)}`);
        this.serverHello = { version, role, features: supported & 0xen, limits, methods, params };
        this.onReady?.();
        return;
      }
      case VERB.PING: this.#control(VERB.PONG, frame.payload); return;
      case VERB.CLOSE_CHANNEL: case VERB.CANCEL_CHANNEL: {
        const id = r.u32();
        const ch = this.#channels.get(id);
        ch?.fail(new RapaceError(frame.methodId === VERB.CANCEL_CHANNEL ? StatusCode.CANCELLED : StatusCode.UNAVAILABLE, `server ${frame.methodId === VERB.CANCEL_CHANNEL ? "cancelled" : "closed"} channel ${id}`));
        return;
      }
      case VERB.GO_AWAY: {
        r.u32();
        const last = r.u32();
        const message = r.string();
        for (const [id, ch] of [...this.#channels]) {
          if (id > last) ch.fail(new RapaceError(StatusCode.UNAVAILABLE, `server going away: ${message}`));
        }
        return;
      }
      default: return;  // Pong, GrantCredits (we send no client streams), verbs ≥ 100
    }
  }

  #receiveData(frame) {
    const ch = this.#channels.get(frame.channelId);
    if (!ch || !(frame.flags & Flags.RESPONSE)) return;  // late frame for a finished call
    if (!(frame.flags & Flags.EOS)) {
      if (ch.item) ch.item(frame.payload);
      return;
    }
    const result = decodeCallResult(frame.payload);
    if (result.status.code !== 0) ch.fail(new RapaceError(result.status.code, result.status.message, result.status.details));
    else ch.result(result.body ?? new Uint8Array(0));
  }

  #didClose(error) {
    if (this.#closed) return;
    this.#closed = error;
    this.onReady?.(error);
    for (const ch of [...this.#channels.values()]) ch.fail(error);
    this.#channels.clear();
  }
}
