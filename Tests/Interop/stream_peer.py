#!/usr/bin/env python3
"""Independent conformance peer for rapace's stream transports (TCP, Unix socket).

Written from shared/spec/wire-protocol.md and vectors.json only (standard library, no
project code): postcard, descriptors, spec 8.1 framing, the Hello handshake as the
initiator and its timeout, unary calls, HIGH_PRIORITY as a mere hint, a server stream with
credit flow control, deadlines, cancellation, Ping both ways, ignored verbs, error
statuses, pipelining, GoAway. Every frame the server sends is checked against the spec
(flags, inline payload, slot, length prefix, ids).

  stream_peer.py tcp HOST:PORT [VECTORS] [--sigterm SERVER_PID] [--keepalive HOST:PORT]
  stream_peer.py unix PATH [VECTORS] [--sigterm SERVER_PID] [--keepalive PATH]
      [--keepalive-interval SECONDS] [--keepalive-timeout SECONDS]

With --sigterm the peer ends by sending SIGTERM to the server and checking its GoAway
(rapace-echo shuts down gracefully on SIGTERM). With --keepalive it also checks the
server's Pings on a second server, run with `rapace-echo serve --keepalive INTERVAL
--keepalive-timeout TIMEOUT` (the peer's --keepalive-interval and --keepalive-timeout,
0.2 s and 2 s by default, must say the same).

Prints `OK <what>` per check; on the first mismatch prints `FAIL <what>` and exits 1.
Every socket read is bounded by a timeout.
"""
import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "RapaceTests", "Vectors", "vectors.json")

# §1.2 flags
DATA, CONTROL, EOS, RESERVED_8, ERROR, HIGH_PRIORITY, CREDITS, RESERVED_80, NO_REPLY, RESPONSE = (
    0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x040, 0x080, 0x100, 0x200)
KNOWN_FLAGS = 0x3FF
INLINE_SLOT = 0xFFFFFFFF
NO_DEADLINE = 0xFFFFFFFFFFFFFFFF
U32_MAX = 0xFFFFFFFF

# §4 verbs
HELLO, OPEN_CHANNEL, CLOSE_CHANNEL, CANCEL_CHANNEL, GRANT_CREDITS, PING, PONG, GO_AWAY = range(8)
# enums
KIND_CALL, KIND_STREAM, KIND_TUNNEL = range(3)
CANCEL_CLIENT, CANCEL_DEADLINE, CANCEL_RESOURCE, CANCEL_PROTOCOL = range(4)
GOAWAY_SHUTDOWN, GOAWAY_PROTOCOL_ERROR = 0, 3
# §7
OK_CODE, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 0, 3, 4, 8, 12

READ_TIMEOUT = 5.0
# §5: the handshake timeout is 5 s by default; a connection without a Hello must not be
# closed before HANDSHAKE_NOT_BEFORE, and must be closed by HANDSHAKE_CLOSE_BY. The latter
# only bounds a server that never closes it (the reader returns as soon as the connection
# closes), generously, as other tests may load the machine meanwhile.
HANDSHAKE_NOT_BEFORE, HANDSHAKE_CLOSE_BY = 4.0, 30.0
DEFAULT_MAX_PAYLOAD = 16 << 20


def fail(what):
    print("FAIL " + what, flush=True)
    sys.exit(1)


def ok(what):
    print("OK " + what, flush=True)


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def method_id(name):
    h = fnv1a64(name.encode("utf-8"))
    return ((h >> 32) ^ h) & U32_MAX


ECHO = {m: method_id("Echo." + m) for m in ("echo", "add", "fail", "countdown", "checksum", "sleep", "blob")}


# ---------------------------------------------------------------------------- postcard (§3)

class DecodeError(Exception):
    pass


class Writer:
    def __init__(self):
        self.out = bytearray()

    def varint(self, value):
        if value < 0:
            raise ValueError("negative varint")
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                self.out.append(byte | 0x80)
            else:
                self.out.append(byte)
                return self

    def u8(self, v):
        self.out.append(v & 0xFF)
        return self

    def u32(self, v):
        if not 0 <= v <= U32_MAX:
            raise ValueError("u32 out of range")
        return self.varint(v)

    def u64(self, v):
        return self.varint(v)

    def i64(self, v):
        return self.varint(((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF)

    i32 = i64

    def boolean(self, v):
        return self.u8(1 if v else 0)

    def f64(self, v):
        self.out += struct.pack("<d", v)
        return self

    def raw(self, data):
        self.out += data
        return self

    def byte_buf(self, data):
        self.varint(len(data))
        self.out += data
        return self

    def string(self, text):
        return self.byte_buf(text.encode("utf-8"))

    def option(self, value, write):
        if value is None:
            return self.u8(0)
        self.u8(1)
        write(self, value)
        return self

    def metadata(self, pairs):
        self.varint(len(pairs))
        for key, value in pairs:
            self.string(key).byte_buf(value)
        return self

    def bytes(self):
        return bytes(self.out)


class Reader:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise DecodeError("needs %d bytes, %d left" % (n, len(self.data) - self.pos))
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def varint(self, bits=64):
        value, shift = 0, 0
        for i in range(10):
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if value >= 1 << bits:
                    raise DecodeError("varint too large for u%d" % bits)
                return value
        raise DecodeError("varint longer than 10 bytes")

    def u8(self):
        return self.take(1)[0]

    def u32(self):
        return self.varint(32)

    def u64(self):
        return self.varint(64)

    def zigzag(self, bits):
        v = self.varint(bits)
        return (v >> 1) ^ -(v & 1)

    def i32(self):
        return self.zigzag(32)

    def i64(self):
        return self.zigzag(64)

    def boolean(self):
        b = self.u8()
        if b > 1:
            raise DecodeError("bool byte %d" % b)
        return b == 1

    def f64(self):
        return struct.unpack("<d", self.take(8))[0]

    def byte_buf(self):
        return self.take(self.varint(64))

    def string(self):
        try:
            return self.byte_buf().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError("invalid UTF-8: %s" % e)

    def option(self, read):
        tag = self.u8()
        if tag == 0:
            return None
        if tag == 1:
            return read(self)
        raise DecodeError("option tag %d" % tag)

    def seq(self, read):
        return [read(self) for _ in range(self.varint(64))]

    def metadata(self):
        return self.seq(lambda r: (r.string(), r.byte_buf()))

    def finish(self):
        if self.pos != len(self.data):
            raise DecodeError("%d trailing bytes" % (len(self.data) - self.pos))


def decode_all(payload, read):
    r = Reader(payload)
    value = read(r)
    r.finish()
    return value


# ---------------------------------------------------------------------------- control messages (§4)

def encode_hello(role, required, supported, limits, methods, params, version=0x00010000):
    w = Writer().u32(version).varint(role).u64(required).u64(supported)
    for v in limits:
        w.u32(v)
    w.varint(len(methods))
    for mid, sig, name in methods:
        w.u32(mid).raw(sig).option(name, Writer.string)
    return w.metadata(params).bytes()


def read_hello(r):
    hello = {"version": r.u32(), "role": r.varint(64), "required": r.u64(), "supported": r.u64(),
             "limits": (r.u32(), r.u32(), r.u32())}
    hello["methods"] = r.seq(lambda r: (r.u32(), r.take(32), r.option(Reader.string)))
    hello["params"] = r.metadata()
    return hello


def encode_open(channel, kind, metadata, credits):
    return Writer().u32(channel).varint(kind).u8(0).metadata(metadata).u32(credits).bytes()


def encode_cancel(channel, reason):
    return Writer().u32(channel).varint(reason).bytes()


def encode_grant(channel, n):
    return Writer().u32(channel).u32(n).bytes()


def encode_close(channel, error):
    w = Writer().u32(channel)
    return (w.varint(0) if error is None else w.varint(1).string(error)).bytes()


def encode_goaway(reason, last, message, metadata):
    return Writer().varint(reason).u32(last).string(message).metadata(metadata).bytes()


def read_goaway(r):
    return {"reason": r.varint(64), "last": r.u32(), "message": r.string(), "metadata": r.metadata()}


def read_channel_reason(r):
    return r.u32(), r.varint(64)


def read_close(r):
    channel = r.u32()
    tag = r.varint(64)
    if tag == 0:
        return channel, None
    if tag == 1:
        return channel, r.string()
    raise DecodeError("CloseReason %d" % tag)


def encode_call_result(code, message, details, trailers, body):
    return (Writer().u32(code).string(message).byte_buf(details).metadata(trailers)
            .option(body, Writer.byte_buf).bytes())


def read_call_result(r):
    return {"code": r.u32(), "message": r.string(), "details": r.byte_buf(), "trailers": r.metadata(),
            "body": r.option(Reader.byte_buf)}


# ---------------------------------------------------------------------------- frames (§1, §8.1)

class Frame:
    def __init__(self, msg_id, channel, method, flags, payload=b"", deadline=NO_DEADLINE, credit=0):
        self.msg_id, self.channel, self.method, self.flags = msg_id, channel, method, flags
        self.payload, self.deadline, self.credit = bytes(payload), deadline, credit
        self.raw = None  # the bytes as received (prefix + descriptor + payload)

    def __repr__(self):
        return "Frame(msg %d, ch %d, method 0x%08X, flags 0x%03X, %d bytes)" % (
            self.msg_id, self.channel, self.method, self.flags, len(self.payload))


def encode_varint(n):
    return Writer().varint(n).bytes()


def encode_frame(frame):
    """§1.1 descriptor + §8.1 framing; inline payloads are in both places."""
    n = len(frame.payload)
    if n <= 16:
        slot, inline = INLINE_SLOT, frame.payload + bytes(16 - n)
    else:
        slot, inline = 0, bytes(16)
    descriptor = struct.pack("<QIIIIIIIIQ", frame.msg_id, frame.channel, frame.method, slot, 0, 0, n,
                             frame.flags, frame.credit, frame.deadline) + inline
    assert len(descriptor) == 64
    return encode_varint(64 + n) + descriptor + frame.payload


def parse_frame(data):
    """A whole stream-framed frame from bytes (vectors); returns (Frame, problems)."""
    r = Reader(data)
    length = r.varint(64)
    prefix = data[:r.pos]
    body = r.take(length)
    r.finish()
    return check_wire_frame(prefix, body)


def check_wire_frame(prefix, body):
    """Decodes descriptor + payload and lists every spec violation found in them."""
    problems = []
    length = len(body)
    (msg_id, channel, method, slot, generation, offset, payload_len, flags, credit,
     deadline) = struct.unpack("<QIIIIIIIIQ", body[:48])
    inline = body[48:64]
    payload = body[64:]
    frame = Frame(msg_id, channel, method, flags, payload, deadline, credit)
    frame.raw = prefix + body
    if payload_len != length - 64:
        problems.append("payload_len %d but length prefix says %d" % (payload_len, length - 64))
    if flags & (RESERVED_8 | RESERVED_80):
        problems.append("reserved flag bits set (flags 0x%X)" % flags)
    if flags & ~KNOWN_FLAGS:
        problems.append("undefined flag bits set (flags 0x%X)" % flags)
    if bool(flags & CONTROL) != (channel == 0):
        problems.append("CONTROL flag %s on channel %d" % ("set" if flags & CONTROL else "missing", channel))
    if payload_len <= 16:
        if slot != INLINE_SLOT:
            problems.append("inline payload (%d bytes) with payload_slot 0x%08X" % (payload_len, slot))
        if inline[:payload_len] != payload[:payload_len]:
            problems.append("inline_payload %s differs from the payload after the descriptor %s"
                            % (inline[:payload_len].hex(), payload.hex()))
        if any(inline[payload_len:]):
            problems.append("inline_payload not zero-filled past payload_len: %s" % inline.hex())
    else:
        if slot != 0:
            problems.append("payload of %d bytes with payload_slot 0x%08X (stream transports: 0)" % (payload_len, slot))
        if any(inline):
            problems.append("non-inline payload but inline_payload is not zero: %s" % inline.hex())
    if slot == 0xFFFFFFFE:
        problems.append("payload_slot 0xFFFFFFFE is reserved")
    if generation or offset:
        problems.append("payload_generation %d / payload_offset %d on a stream transport" % (generation, offset))
    # Stricter than spec 8.1 (a receiver accepts overlong varints): what this project sends.
    if prefix != encode_varint(length):
        problems.append("length prefix %s is not the minimal varint of %d" % (prefix.hex(), length))
    return frame, problems


class Closed(Exception):
    pass


# ---------------------------------------------------------------------------- the connection

class Conn:
    """One connection, we the initiator. Keeps the spec's per-peer state and checks every
    frame the server sends as it arrives."""

    def __init__(self, kind, address, name):
        self.kind, self.name = kind, name
        if kind == "tcp":
            host, port = address.rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(READ_TIMEOUT)
            self.sock.connect(address)
        self.buffer = bytearray()
        self.eof = False
        self.next_msg = 1
        self.next_channel = 1
        self.server_next_msg = 1      # the server's counter as we expect it
        self.requests = {}            # channel -> (msg_id, method_id) of our request
        self.finished = set()         # channels whose terminal frame arrived
        self.cancelled = set()        # channels we cancelled: nothing may arrive any more
        self.inbox = []               # checked frames not yet consumed
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.frames_checked = 0

    # -- sending

    def take_msg(self):
        m = self.next_msg
        self.next_msg += 1
        return m

    def new_channel(self):
        c = self.next_channel
        self.next_channel += 2
        return c

    def send_raw(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            fail("%s: send failed: %s" % (self.name, e))

    def control(self, verb, payload, flags=CONTROL):
        frame = Frame(self.take_msg(), 0, verb, flags, payload)
        self.send_raw(encode_frame(frame))
        return frame

    def call_frames(self, method, args, kind=KIND_CALL, metadata=(), credits=U32_MAX, deadline=NO_DEADLINE,
                    flags=DATA | EOS, credit_grant=0):
        """OpenChannel + request for a new channel, as bytes (not sent); returns (channel, bytes)."""
        channel = self.new_channel()
        opened = Frame(self.take_msg(), 0, OPEN_CHANNEL, CONTROL, encode_open(channel, kind, list(metadata), credits))
        request = Frame(self.take_msg(), channel, method, flags, args, deadline=deadline, credit=credit_grant)
        self.requests[channel] = (request.msg_id, method)
        return channel, encode_frame(opened) + encode_frame(request)

    def start_call(self, method, args, **options):
        channel, data = self.call_frames(method, args, **options)
        self.send_raw(data)
        return channel

    # -- receiving

    def fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
        self.buffer += chunk

    def read_frame(self, timeout):
        """The next frame off the wire (checked), Closed at a clean EOF, TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            if self.buffer:
                r = Reader(self.buffer)
                try:
                    length = r.varint(64)
                except DecodeError as e:
                    if "needs" not in str(e):
                        fail("%s: bad length prefix %s: %s" % (self.name, bytes(self.buffer[:11]).hex(), e))
                    length = None
                if length is not None:
                    if length < 64:
                        fail("%s: frame length %d below 64" % (self.name, length))
                    if length - 64 > self.max_payload:
                        fail("%s: frame payload %d above the max payload %d" % (self.name, length - 64, self.max_payload))
                    if len(self.buffer) - r.pos >= length:
                        prefix = bytes(self.buffer[:r.pos])
                        body = bytes(self.buffer[r.pos:r.pos + length])
                        del self.buffer[:r.pos + length]
                        return self.check(prefix, body)
            if self.eof:
                if self.buffer:
                    fail("%s: EOF inside a frame (%d bytes buffered)" % (self.name, len(self.buffer)))
                raise Closed
            self.fill(deadline)

    def check(self, prefix, body):
        frame, problems = check_wire_frame(prefix, body)
        if problems:
            fail("%s: server frame %r violates the spec: %s; bytes %s" % (
                self.name, frame, "; ".join(problems), frame.raw[:96].hex()))
        if frame.flags & CREDITS:
            fail("%s: server set CREDITS (project never does): %r" % (self.name, frame))
        if self.kind == "tcp" and frame.deadline != NO_DEADLINE:
            fail("%s: deadline_ns 0x%X set over TCP (§6.2): %r" % (self.name, frame.deadline, frame))
        if frame.flags & RESPONSE:
            if frame.channel not in self.requests:
                fail("%s: RESPONSE on channel %d we never opened: %r" % (self.name, frame.channel, frame))
            msg, method = self.requests[frame.channel]
            if frame.msg_id != msg:
                fail("%s: response msg_id %d does not echo the request's %d (channel %d)" % (
                    self.name, frame.msg_id, msg, frame.channel))
            if frame.method != method:
                fail("%s: response method_id 0x%08X, request 0x%08X" % (self.name, frame.method, method))
        else:
            if frame.msg_id != self.server_next_msg:
                fail("%s: server msg_id %d, expected %d (one counter, +1 per non-RESPONSE frame): %r" % (
                    self.name, frame.msg_id, self.server_next_msg, frame))
            self.server_next_msg += 1
        if frame.channel != 0:
            if frame.channel % 2 == 1 and frame.channel not in self.requests:
                fail("%s: frame on odd channel %d that we never opened: %r" % (self.name, frame.channel, frame))
            if frame.channel in self.cancelled:
                fail("%s: frame on channel %d after we cancelled it: %r" % (self.name, frame.channel, frame))
            if frame.channel in self.finished:
                fail("%s: frame on channel %d after its EOS: %r" % (self.name, frame.channel, frame))
            if frame.flags & EOS:
                self.finished.add(frame.channel)
            if frame.flags & EOS and frame.flags & RESPONSE:
                # a terminal frame: CallResult, ERROR exactly when code != 0
                result = self.decode(frame.payload, read_call_result, "CallResult")
                if bool(frame.flags & ERROR) != (result["code"] != 0):
                    fail("%s: ERROR flag %s with status code %d (§1.2): %r" % (
                        self.name, "set" if frame.flags & ERROR else "clear", result["code"], frame))
                if (result["code"] != 0) and result["body"] is not None:
                    fail("%s: error status %d with a body: %r" % (self.name, result["code"], frame))
                frame.result = result
            elif frame.flags & ERROR:
                # Project choice (spec 1.2 ties ERROR to a CallResult's code): only terminals carry it.
                fail("%s: ERROR on a frame that is not a terminal response: %r" % (self.name, frame))
        else:
            self.check_control(frame)
        self.frames_checked += 1
        return frame

    def decode(self, payload, read, what):
        try:
            return decode_all(payload, read)
        except DecodeError as e:
            fail("%s: %s %s does not decode: %s" % (self.name, what, payload.hex(), e))

    def check_control(self, frame):
        verb = frame.method
        if verb == HELLO:
            frame.hello = self.decode(frame.payload, read_hello, "Hello")
        elif verb == OPEN_CHANNEL:
            channel = self.decode(frame.payload, lambda r: (r.u32(), r.varint(), r.option(
                lambda r: (r.u32(), r.u32(), r.varint())), r.metadata(), r.u32()), "OpenChannel")[0]
            if channel == 0 or channel % 2 == 1:
                fail("%s: the acceptor opened channel %d (it allocates even ids)" % (self.name, channel))
        elif verb in (CANCEL_CHANNEL,):
            frame.cancel = self.decode(frame.payload, read_channel_reason, "CancelChannel")
        elif verb == CLOSE_CHANNEL:
            frame.close = self.decode(frame.payload, read_close, "CloseChannel")
        elif verb == GRANT_CREDITS:
            self.decode(frame.payload, lambda r: (r.u32(), r.u32()), "GrantCredits")
        elif verb in (PING, PONG):
            if len(frame.payload) != 8:
                fail("%s: %s payload of %d bytes" % (self.name, "Ping" if verb == PING else "Pong", len(frame.payload)))
        elif verb == GO_AWAY:
            frame.goaway = self.decode(frame.payload, read_goaway, "GoAway")
        elif verb < 100:
            fail("%s: server sent unknown control verb %d" % (self.name, verb))
        # Project choice, not spec: control frames carry CONTROL (and CREDITS never) only.
        if frame.flags & (RESPONSE | EOS | ERROR):
            fail("%s: control frame with RESPONSE/EOS/ERROR flags: %r" % (self.name, frame))

    def next_frame(self, timeout=READ_TIMEOUT, what="a frame"):
        try:
            frame = self.read_frame(timeout)
        except TimeoutError:
            fail("%s: no frame within %.1f s while waiting for %s" % (self.name, timeout, what))
        except Closed:
            fail("%s: server closed the connection while we waited for %s" % (self.name, what))
        if frame.channel == 0 and frame.method == PING:
            self.control(PONG, frame.payload)  # answer the server's keepalive, keep going
        return frame

    def wait_for(self, predicate, what, timeout=READ_TIMEOUT):
        """The first frame (inbox first) matching `predicate`; others stay in the inbox."""
        for i, frame in enumerate(self.inbox):
            if predicate(frame):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next_frame(max(0.001, deadline - time.monotonic()), what)
            if frame.channel == 0 and frame.method in (GO_AWAY, CLOSE_CHANNEL):
                fail("%s: server sent %s while we waited for %s: %s" % (
                    self.name, "GoAway" if frame.method == GO_AWAY else "CloseChannel", what, frame.payload.hex()))
            if predicate(frame):
                return frame
            self.inbox.append(frame)

    def result(self, channel, what, timeout=READ_TIMEOUT):
        """The unary answer on `channel`: checks its flags, returns the CallResult."""
        frame = self.wait_for(lambda f: f.channel == channel, what, timeout)
        expected = DATA | EOS | RESPONSE | (ERROR if frame.flags & ERROR else 0)
        if frame.flags & ~HIGH_PRIORITY != expected:
            fail("%s: %s answered with flags 0x%X, want DATA|EOS|RESPONSE(|ERROR): %r" % (self.name, what, frame.flags, frame))
        return frame.result

    def expect_ok(self, channel, what, timeout=READ_TIMEOUT):
        result = self.result(channel, what, timeout)
        if result["code"] != 0 or result["body"] is None:
            fail("%s: %s failed: status %d %r, body %r" % (self.name, what, result["code"], result["message"], result["body"]))
        return result["body"]

    def expect_status(self, channel, code, what, timeout=READ_TIMEOUT):
        result = self.result(channel, what, timeout)
        if result["code"] != code:
            fail("%s: %s gave status %d %r, want %d" % (self.name, what, result["code"], result["message"], code))
        return result

    def expect_silence(self, seconds, what, allowed=lambda f: False):
        """Reads for `seconds`; any frame not `allowed` fails (it went to the inbox otherwise)."""
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                frame = self.read_frame(remaining)
            except TimeoutError:
                return
            except Closed:
                fail("%s: server closed the connection during %s" % (self.name, what))
            if frame.channel == 0 and frame.method == PING:
                self.control(PONG, frame.payload)
                continue
            if not allowed(frame):
                fail("%s: unexpected %r during %s: %s" % (self.name, frame, what, frame.payload[:64].hex()))
            self.inbox.append(frame)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def our_hello():
    return encode_hello(0, 0x2, 0xE, (16 << 20, 0, 0), [], [])


def handshake(conn):
    """§5: Hello first without waiting (msg_id 1), then the server's Hello."""
    conn.control(HELLO, our_hello())
    frame = conn.next_frame(what="the server's Hello")
    if frame.channel != 0 or frame.method != HELLO:
        fail("%s: first server frame is not a Hello: %r" % (conn.name, frame))
    if frame.msg_id != 1:
        fail("%s: server Hello has msg_id %d, want 1" % (conn.name, frame.msg_id))
    hello = frame.hello
    if hello["version"] >> 16 != 1:
        fail("%s: server protocol_version 0x%08X" % (conn.name, hello["version"]))
    if hello["role"] != 1:
        fail("%s: server role %d, want acceptor (1)" % (conn.name, hello["role"]))
    if hello["required"] & ~0xE:
        fail("%s: server requires features 0x%X outside what we support (0xE)" % (conn.name, hello["required"]))
    if not hello["supported"] & 0x2:
        fail("%s: server does not support the call envelope (bit 1) we require" % conn.name)
    ids = [m[0] for m in hello["methods"]]
    if len(set(ids)) != len(ids):
        fail("%s: duplicate method ids in the server's Hello: %s" % (conn.name, ids))
    missing = [name for name, mid in ECHO.items() if mid not in ids]
    if missing:
        fail("%s: server Hello lacks Echo methods %s" % (conn.name, missing))
    if hello["limits"][0]:
        conn.max_payload = min(conn.max_payload, hello["limits"][0])
    return hello


# ---------------------------------------------------------------------------- vectors

def check_vectors(path):
    """Our own codec against every vector, so that the checks below rest on it."""
    with open(path) as f:
        vectors = json.load(f)
    for entry in vectors["method_ids"]:
        if method_id(entry["name"]) != int(entry["id"], 16):
            fail("vector: method id of %s is 0x%08X, vector %s" % (entry["name"], method_id(entry["name"]), entry["id"]))
    encoders = {
        "bool": lambda w, v: w.boolean(v), "u8": lambda w, v: w.u8(v), "u16": lambda w, v: w.varint(v),
        "u32": lambda w, v: w.u32(v), "u64": lambda w, v: w.u64(v), "i32": lambda w, v: w.i32(v),
        "i64": lambda w, v: w.i64(v), "f64": lambda w, v: w.f64(v), "String": lambda w, v: w.string(v),
        "[UInt8]": lambda w, v: w.byte_buf(bytes(v)), "Optional<u32>": lambda w, v: w.option(v, Writer.u32),
        "[String]": lambda w, v: [w.varint(len(v))] + [w.string(s) for s in v],
    }
    decoders = {
        "bool": Reader.boolean, "u8": Reader.u8, "u16": lambda r: r.varint(16), "u32": Reader.u32, "u64": Reader.u64,
        "i32": Reader.i32, "i64": Reader.i64, "f64": Reader.f64, "String": Reader.string,
        "[UInt8]": lambda r: list(r.byte_buf()), "Optional<u32>": lambda r: r.option(Reader.u32),
        "[String]": lambda r: r.seq(Reader.string),
    }
    for entry in vectors["postcard"]:
        kind, value, hexed = entry["type"], entry["value"], entry["hex"]
        if kind in encoders:
            w = Writer()
            encoders[kind](w, value)
            got = decode_all(bytes.fromhex(hexed), decoders[kind])
        elif kind.startswith("(i32, i32)"):
            w = Writer().i32(value[0]).i32(value[1])
            got = list(decode_all(bytes.fromhex(hexed), lambda r: [r.i32(), r.i32()]))
        elif kind.startswith("enum Shape"):
            w = Writer().varint(1).u32(4)
            got = decode_all(bytes.fromhex(hexed), lambda r: "square(%d)" % r.u32() if r.varint() == 1 else None)
        else:
            fail("vector: postcard type %r unknown to the peer" % kind)
        if w.bytes().hex() != hexed or got != value:
            fail("vector: postcard %s %r: encoded %s, decoded %r; vector %s" % (kind, value, w.bytes().hex(), got, hexed))
    cp = vectors["control_payloads"]
    echo_method = (ECHO["echo"], bytes(32), "Echo.echo")
    expected_control = {
        "Hello(initiator": our_hello(),
        "Hello(acceptor": encode_hello(1, 0x2, 0xE, (16 << 20, 0, 0), [echo_method], []),
        "OpenChannel(channel 1": encode_open(1, KIND_CALL, [], U32_MAX),
        "OpenChannel(channel 3": encode_open(3, KIND_STREAM, [("rapace.deadline_remaining_ms", struct.pack("<I", 1500))], 65536),
        "CancelChannel(channel 5": encode_cancel(5, CANCEL_DEADLINE),
        "GrantCredits(channel 3": encode_grant(3, 4096),
        "CloseChannel(channel 7, Normal": encode_close(7, None),
        "CloseChannel(channel 7, Error": encode_close(7, "boom"),
        "GoAway(Shutdown": encode_goaway(GOAWAY_SHUTDOWN, 9, "bye", []),
        "Ping payload": bytes.fromhex("deadbeefcafebabe"),
    }
    for prefix, payload in expected_control.items():
        matches = [v for k, v in cp.items() if k.startswith(prefix)]
        if len(matches) != 1 or matches[0] != payload.hex():
            fail("vector: control payload %r: ours %s, vector %s" % (prefix, payload.hex(), matches))
    hello = decode_all(bytes.fromhex(next(v for k, v in cp.items() if k.startswith("Hello(acceptor"))), read_hello)
    if hello["methods"] != [echo_method] or hello["role"] != 1:
        fail("vector: acceptor Hello decodes to %r" % hello)
    cr = vectors["call_results"]
    expected_results = {
        "CallResult OK, body = postcard(Int32 5)": encode_call_result(0, "", b"", [], Writer().i32(5).bytes()),
        "CallResult OK, unit return": encode_call_result(0, "", b"", [], b""),
        "CallResult UNIMPLEMENTED(12)": encode_call_result(12, "unknown method", b"", [], None),
        "CallResult INTERNAL(13)": encode_call_result(13, "oops", b"", [("k", b"\x01")], None),
    }
    for prefix, payload in expected_results.items():
        hexed = next((v for k, v in cr.items() if k.startswith(prefix)), None)
        if hexed != payload.hex() or encode_call_result(**_as_args(decode_all(payload, read_call_result))) != payload:
            fail("vector: %s: ours %s, vector %s" % (prefix, payload.hex(), hexed))
    frames = vectors["frames"]
    expected_frames = {
        "initiator Hello": Frame(1, 0, HELLO, CONTROL, our_hello()),
        "OpenChannel(1, Call)": Frame(2, 0, OPEN_CHANNEL, CONTROL, encode_open(1, KIND_CALL, [], U32_MAX)),
        "Echo.add(2, 3) request": Frame(3, 1, ECHO["add"], DATA | EOS, Writer().i32(2).i32(3).bytes()),
        "Echo.add response": Frame(3, 1, ECHO["add"], DATA | EOS | RESPONSE, expected_results["CallResult OK, body = postcard(Int32 5)"]),
        "20-byte payload": Frame(4, 1, 0, DATA, bytes(range(20))),
    }
    for prefix, frame in expected_frames.items():
        hexed = next((v for k, v in frames.items() if k.startswith(prefix)), None)
        if hexed != encode_frame(frame).hex():
            fail("vector: frame %s: ours %s, vector %s" % (prefix, encode_frame(frame).hex(), hexed))
        parsed, problems = parse_frame(bytes.fromhex(hexed))
        if problems or parsed.payload != frame.payload:
            fail("vector: frame %s fails our own checks: %s" % (prefix, problems))
    ws = next(v for k, v in frames.items() if k.startswith("WebSocket binary message"))
    if bytes.fromhex(ws) != encode_frame(expected_frames["Echo.add(2, 3) request"])[1:]:
        fail("vector: the WebSocket message is not the stream frame without its prefix")
    ok("vectors: %d method ids, %d postcard values, %d control payloads, %d call results, %d frames" % (
        len(vectors["method_ids"]), len(vectors["postcard"]), len(cp), len(cr), len(frames)))
    return frames


def _as_args(result):
    return {"code": result["code"], "message": result["message"], "details": result["details"],
            "trailers": result["trailers"], "body": result["body"]}


def vector_frame(frames, prefix):
    return bytes.fromhex(next(v for k, v in frames.items() if k.startswith(prefix)))


# ---------------------------------------------------------------------------- the checks

def u32_item(payload):
    return decode_all(payload, Reader.u32)


def check_session(kind, address, frames):
    conn = Conn(kind, address, kind)

    # Handshake, then Echo.add(2, 3) byte for byte as in the vectors (msg_ids 1, 2, 3, channel 1).
    conn.send_raw(vector_frame(frames, "initiator Hello"))
    conn.next_msg = 2
    frame = conn.next_frame(what="the server's Hello")
    if frame.method != HELLO or frame.channel != 0 or frame.msg_id != 1:
        fail("%s: first server frame is not its Hello (msg_id 1): %r" % (kind, frame))
    hello = frame.hello
    if hello["version"] != 0x00010000 or hello["role"] != 1 or hello["required"] & ~0xE or not hello["supported"] & 2:
        fail("%s: server Hello not acceptable: %r" % (kind, hello))
    ids = [m[0] for m in hello["methods"]]
    if len(set(ids)) != len(ids) or any(mid not in ids for mid in ECHO.values()):
        fail("%s: server Hello methods %s: duplicates, or Echo methods missing" % (kind, ["0x%08X" % i for i in ids]))
    if hello["limits"][0]:
        conn.max_payload = min(conn.max_payload, hello["limits"][0])
    ok("%s hello: version 0x%08X, acceptor, required 0x%X, supported 0x%X, limits %s, %d methods" % (
        kind, hello["version"], hello["required"], hello["supported"], hello["limits"], len(ids)))

    conn.send_raw(vector_frame(frames, "OpenChannel(1, Call)") + vector_frame(frames, "Echo.add(2, 3) request"))
    conn.next_msg, conn.next_channel = 4, 3
    conn.requests[1] = (3, ECHO["add"])
    answer = conn.wait_for(lambda f: f.channel == 1, "the Echo.add vector's answer")
    if answer.raw != vector_frame(frames, "Echo.add response"):
        fail("%s: Echo.add(2, 3) answer %s differs from the vector" % (kind, answer.raw.hex()))
    ok("%s add(2,3) answer equals the vector byte for byte" % kind)

    # echo
    text = "héllo wörld ✓"
    c = conn.start_call(ECHO["echo"], Writer().string(text).bytes())
    if decode_all(conn.expect_ok(c, "echo"), Reader.string) != text:
        fail("%s: echo did not return its argument" % kind)
    long_text = "x" * 5000 + "é"
    c = conn.start_call(ECHO["echo"], Writer().string(long_text).bytes())
    if decode_all(conn.expect_ok(c, "echo (5 KB)"), Reader.string) != long_text:
        fail("%s: echo of 5 KB did not return its argument" % kind)
    ok("%s echo" % kind)

    # add: negative numbers (zigzag both ways)
    for a, b in [(-7, 3), (-1000000, -2345), (0, 0)]:
        c = conn.start_call(ECHO["add"], Writer().i32(a).i32(b).bytes())
        got = decode_all(conn.expect_ok(c, "add(%d,%d)" % (a, b)), Reader.i32)
        if got != a + b:
            fail("%s: add(%d,%d) = %d" % (kind, a, b, got))
    ok("%s add" % kind)

    # fail: code and message intact, ERROR exactly when code != 0 (checked on every frame)
    for code, message in [(3, "bad argument"), (14, "gone"), (404, "not here"), (13, ""), (7, "ünïcode ✓")]:
        c = conn.start_call(ECHO["fail"], Writer().u32(code).string(message).bytes())
        result = conn.expect_status(c, code, "fail(%d)" % code)
        if result["message"] != message or result["body"] is not None:
            fail("%s: fail(%d, %r) answered message %r body %r" % (kind, code, message, result["message"], result["body"]))
    ok("%s fail: codes and messages intact, ERROR flag exactly when code != 0" % kind)

    check_high_priority(conn, kind)
    check_countdown(conn, kind)

    # checksum: a request payload well above 16 bytes (payload_slot 0 on our side)
    data = bytes((i * 31) & 0xFF for i in range(100000))
    c = conn.start_call(ECHO["checksum"], Writer().byte_buf(data).bytes())
    got = decode_all(conn.expect_ok(c, "checksum"), Reader.u64)
    if got != fnv1a64(data):
        fail("%s: checksum = %d, want fnv1a64 %d" % (kind, got, fnv1a64(data)))
    ok("%s checksum of 100000 bytes" % kind)

    # blob: byte i is i % 251
    for size in (10, 300, 1 << 20):
        c = conn.start_call(ECHO["blob"], Writer().u32(size).bytes())
        blob = decode_all(conn.expect_ok(c, "blob(%d)" % size, timeout=15), Reader.byte_buf)
        if len(blob) != size or blob != bytes(i % 251 for i in range(size)):
            fail("%s: blob(%d) returned %d bytes, not i %% 251" % (kind, size, len(blob)))
    ok("%s blob of 10, 300 and 1 MiB bytes" % kind)

    # sleep: a short one succeeds with a unit body (empty bytes)
    c = conn.start_call(ECHO["sleep"], Writer().u32(20).bytes())
    if conn.expect_ok(c, "sleep(20)") != b"":
        fail("%s: sleep(20) body is not empty" % kind)
    ok("%s sleep(20) -> unit (body empty bytes)" % kind)

    check_deadline(conn, kind)

    # Ping/Pong: same 8 bytes, on channel 0 (CONTROL checked on every frame)
    ping = bytes.fromhex("deadbeefcafebabe")
    conn.control(PING, ping)
    pong = conn.wait_for(lambda f: f.channel == 0 and f.method == PONG, "the Pong")
    if pong.payload != ping:
        fail("%s: Pong carries %s, Ping was %s" % (kind, pong.payload.hex(), ping.hex()))
    ok("%s ping -> pong with the same 8 bytes" % kind)

    # verbs >= 100 are ignored, whatever their payload; the connection keeps working
    conn.control(100, b"")
    conn.control(4242, b"\xff\xfe\xfd not postcard")
    conn.control(U32_MAX, bytes(40))
    conn.control(PING, b"after100")
    pong = conn.wait_for(lambda f: f.channel == 0 and f.method == PONG, "the Pong after verbs >= 100")
    if pong.payload != b"after100" or conn.inbox:
        fail("%s: after verbs >= 100: pong %s, other frames %r" % (kind, pong.payload, conn.inbox))
    ok("%s control verbs 100, 4242, 0xFFFFFFFF ignored" % kind)

    # CancelChannel of a running sleep: nothing more arrives on that channel
    c = conn.start_call(ECHO["sleep"], Writer().u32(1000).bytes())
    conn.expect_silence(0.1, "the running sleep(1000)")
    conn.control(CANCEL_CHANNEL, encode_cancel(c, CANCEL_CLIENT))
    conn.cancelled.add(c)
    c2 = conn.start_call(ECHO["echo"], Writer().string("after cancel").bytes())
    if decode_all(conn.expect_ok(c2, "echo after cancel"), Reader.string) != "after cancel":
        fail("%s: echo after cancel" % kind)
    conn.expect_silence(1.2, "the time the cancelled sleep(1000) would have ended")
    ok("%s cancel of a running sleep: nothing more on its channel" % kind)

    # unknown method -> UNIMPLEMENTED
    c = conn.start_call(0x12345678, b"")
    conn.expect_status(c, UNIMPLEMENTED, "an unknown method")
    ok("%s unknown method -> UNIMPLEMENTED" % kind)

    # undecodable arguments -> INVALID_ARGUMENT
    for method, args, what in [
        ("add", Writer().i32(2).bytes(), "add with one argument"),
        ("add", Writer().i32(2).i32(3).u8(0).bytes(), "add with a trailing byte"),
        ("echo", bytes.fromhex("02fffe"), "echo with invalid UTF-8"),
        ("echo", bytes.fromhex("05616263"), "echo with a length past the end"),
        ("add", bytes.fromhex("ffffffffffffffffffffff"), "add with an 11-byte varint"),
        ("sleep", Writer().u64(1 << 32).bytes(), "sleep with a varint above u32"),
    ]:
        c = conn.start_call(ECHO[method], args)
        conn.expect_status(c, INVALID_ARGUMENT, what)
    ok("%s undecodable arguments -> INVALID_ARGUMENT (6 kinds)" % kind)

    check_pipelined(conn, kind)

    # DATA on a channel never opened -> CancelChannel { C, protocolViolation } (§6.1)
    c = conn.new_channel()
    conn.send_raw(encode_frame(Frame(conn.take_msg(), c, ECHO["echo"], DATA | EOS, Writer().string("x").bytes())))
    frame = conn.wait_for(lambda f: f.channel == 0 and f.method == CANCEL_CHANNEL, "CancelChannel for an unopened channel")
    if frame.cancel != (c, CANCEL_PROTOCOL):
        fail("%s: DATA on unopened channel %d answered CancelChannel%r" % (kind, c, frame.cancel))
    conn.expect_silence(0.2, "after DATA on an unopened channel")
    # Once a later channel is opened, that id was skipped: still never opened (§6.1).
    later = conn.start_call(ECHO["add"], Writer().i32(1).i32(1).bytes())
    conn.expect_status(later, OK_CODE, "add on the channel after an unopened one")
    conn.send_raw(encode_frame(Frame(conn.take_msg(), c, ECHO["echo"], DATA | EOS, Writer().string("x").bytes())))
    frame = conn.wait_for(lambda f: f.channel == 0 and f.method == CANCEL_CHANNEL, "CancelChannel for a skipped channel")
    if frame.cancel != (c, CANCEL_PROTOCOL):
        fail("%s: DATA on skipped channel %d answered CancelChannel%r" % (kind, c, frame.cancel))
    conn.expect_silence(0.2, "after DATA on a skipped channel")
    ok("%s DATA on a channel never opened (also once skipped) -> CancelChannel protocolViolation" % kind)

    # Clean end: GoAway(shutdown); nothing in flight, so the server closes; no stray frame.
    if conn.inbox:
        fail("%s: unconsumed frames before GoAway: %r" % (kind, conn.inbox))
    conn.control(GO_AWAY, encode_goaway(GOAWAY_SHUTDOWN, 0, "done", []))
    try:
        frame = conn.read_frame(5.0)
        fail("%s: after our GoAway the server sent %r: %s" % (kind, frame, frame.payload.hex()))
    except TimeoutError:
        fail("%s: the server did not close within 5 s after our GoAway with nothing in flight" % kind)
    except Closed:
        pass
    conn.close()
    ok("%s goaway: server closed cleanly (%d server frames checked, msg_ids 1..%d)" % (
        kind, conn.frames_checked, conn.server_next_msg - 1))


def channel_answer(conn, channel, what):
    """Every frame the server sends on `channel` up to its EOS, as (flags, method, payload)."""
    frames = []
    while True:
        frame = conn.wait_for(lambda f: f.channel == channel, what)
        frames.append((frame.flags, frame.method, frame.payload))
        if frame.flags & EOS:
            return frames


def check_high_priority(conn, kind):
    """§1.2: HIGH_PRIORITY is a scheduling hint. The same call with and without it on the
    request gets the same answer: flags, method_id and payload of every frame (only the
    echoed msg_id differs), for unary calls that succeed and fail, an unknown method, and a
    server stream."""
    calls = [
        ("add(2, 3)", ECHO["add"], Writer().i32(2).i32(3).bytes(), KIND_CALL, U32_MAX),
        ("echo of 40 bytes", ECHO["echo"], Writer().string("p" * 40).bytes(), KIND_CALL, U32_MAX),
        ("fail(404)", ECHO["fail"], Writer().u32(404).string("not here").bytes(), KIND_CALL, U32_MAX),
        ("an unknown method", 0x0BADF00D, b"", KIND_CALL, U32_MAX),
        ("countdown(5)", ECHO["countdown"], Writer().u32(5).bytes(), KIND_STREAM, 1 << 16),
    ]
    for what, method, args, channel_kind, credits in calls:
        plain = conn.start_call(method, args, kind=channel_kind, credits=credits)
        plain_frames = channel_answer(conn, plain, what)
        hinted = conn.start_call(method, args, kind=channel_kind, credits=credits, flags=DATA | EOS | HIGH_PRIORITY)
        hinted_frames = channel_answer(conn, hinted, what + " with HIGH_PRIORITY")
        if hinted_frames != plain_frames:
            fail("%s: %s with HIGH_PRIORITY answered %s, without it %s" % (
                kind, what, [(hex(f), hex(m), p.hex()) for f, m, p in hinted_frames],
                [(hex(f), hex(m), p.hex()) for f, m, p in plain_frames]))
    ok("%s HIGH_PRIORITY on a request is only a hint: %d calls answered exactly as without it" % (kind, len(calls)))


def check_countdown(conn, kind):
    """§6.3 with a small window: items in order, never beyond the granted credit, grants as
    we consume, a stall while we hold credit back, terminal with body nil."""
    start, window, hold_at = 300, 8, 250
    c = conn.start_call(ECHO["countdown"], Writer().u32(start).bytes(), kind=KIND_STREAM, credits=window)
    granted, received, consumed, expected = window, 0, 0, start
    holding, stalled, held_since = False, False, 0.0
    while True:
        try:
            frame = conn.read_frame(0.4 if holding else READ_TIMEOUT)
        except TimeoutError:
            if not holding:
                fail("%s: countdown stalled at item %d with %d bytes of credit left" % (kind, expected, granted - received))
            # We held back the grant: the server waits once the credit left fits no 2-byte
            # item (a loaded machine may take a while to send what still fits).
            if granted - received >= 2:
                if time.monotonic() - held_since < READ_TIMEOUT:
                    continue
                fail("%s: countdown stalled at item %d with %d bytes of credit left" % (kind, expected, granted - received))
            stalled, holding = True, False
            conn.control(GRANT_CREDITS, encode_grant(c, consumed))
            granted, consumed = granted + consumed, 0
            continue
        except Closed:
            fail("%s: server closed during countdown" % kind)
        if frame.channel != c:
            if frame.channel == 0 and frame.method == PING:
                conn.control(PONG, frame.payload)
            else:
                conn.inbox.append(frame)
            continue
        if frame.flags & EOS:
            if frame.flags & ~HIGH_PRIORITY != DATA | EOS | RESPONSE:
                fail("%s: countdown terminal flags 0x%X, want DATA|EOS|RESPONSE" % (kind, frame.flags))
            if frame.result["code"] != 0 or frame.result["body"] is not None:
                fail("%s: countdown terminal %r, want OK with body nil" % (kind, frame.result))
            break
        if frame.flags & ~HIGH_PRIORITY != DATA | RESPONSE:
            fail("%s: countdown item flags 0x%X, want DATA|RESPONSE" % (kind, frame.flags))
        item = u32_item(frame.payload)
        if item != expected:
            fail("%s: countdown item %d, expected %d" % (kind, item, expected))
        received += len(frame.payload)
        if received > granted:
            fail("%s: credit overrun: %d item bytes received, %d granted (item %d)" % (kind, received, granted, item))
        expected -= 1
        consumed += len(frame.payload)
        if item == hold_at:
            holding, held_since = True, time.monotonic()
        if not holding and consumed >= window // 2:
            # grant back what we consumed, half a window at a time
            conn.control(GRANT_CREDITS, encode_grant(c, consumed))
            granted, consumed = granted + consumed, 0
    if expected != 0:
        fail("%s: countdown ended at %d, %d items missing" % (kind, expected, expected))
    if not stalled:
        fail("%s: countdown never waited for credit while we held it back" % kind)
    ok("%s countdown(%d): items in order, %d-byte window never overrun (%d granted in all), waits while credit is held back, terminal body nil" % (
        kind, start, window, granted))

    # Opened with no credit, then granted at once (ahead of consuming anything): §6.3
    # allows it, so the items wait for the grant and then all arrive.
    c = conn.start_call(ECHO["countdown"], Writer().u32(3).bytes(), kind=KIND_STREAM, credits=0)
    conn.expect_silence(0.2, "countdown(3) opened with no credit, before any grant")
    conn.control(GRANT_CREDITS, encode_grant(c, 64))
    items = []
    while True:
        frame = conn.wait_for(lambda f: f.channel == c, "countdown(3) after a grant of 64 bytes")
        if frame.flags & EOS:
            if frame.result["code"] != 0 or frame.result["body"] is not None:
                fail("%s: countdown(3) opened with no credit ended %r, want OK with body nil" % (kind, frame.result))
            break
        items.append(u32_item(frame.payload))
    if items != [3, 2, 1]:
        fail("%s: countdown(3) opened with no credit gave %r, want [3, 2, 1]" % (kind, items))
    ok("%s countdown opened with no credit waits for the grant, then sends every item" % kind)

    # §1.2: CREDITS makes credit_grant valid for the frame's channel. A grant carried by the
    # request itself, and one in a frame on the channel that carries nothing else.
    c = conn.start_call(ECHO["countdown"], Writer().u32(3).bytes(), kind=KIND_STREAM, credits=0,
                        flags=DATA | EOS | CREDITS, credit_grant=64)
    expect_countdown_items(conn, kind, c, "countdown(3) opened with no credit, 64 granted by the request's CREDITS")
    c = conn.start_call(ECHO["countdown"], Writer().u32(3).bytes(), kind=KIND_STREAM, credits=0)
    conn.expect_silence(0.2, "countdown(3) opened with no credit, before the CREDITS frame")
    conn.send_raw(encode_frame(Frame(conn.take_msg(), c, ECHO["countdown"], CREDITS, credit=64)))
    expect_countdown_items(conn, kind, c, "countdown(3) after a CREDITS-only frame granting 64")
    ok("%s credit_grant honoured with CREDITS, on the request and in a frame of its own" % kind)

    # A window smaller than one item that we never raise: the item waits for a grant the
    # project's creditGrowthTimeout (2 s by default), then the stream ends RESOURCE_EXHAUSTED.
    c = conn.start_call(ECHO["countdown"], Writer().u32(200).bytes(), kind=KIND_STREAM, credits=1)
    frame = conn.wait_for(lambda f: f.channel == c, "countdown(200) with a 1-byte window")
    if not frame.flags & EOS or frame.result["code"] != RESOURCE_EXHAUSTED:
        fail("%s: countdown(200) with a 1-byte window: %r %r, want RESOURCE_EXHAUSTED" % (kind, frame, getattr(frame, "result", None)))
    ok("%s countdown with a window smaller than one item, never raised -> RESOURCE_EXHAUSTED, nothing sent" % kind)


def expect_countdown_items(conn, kind, channel, what):
    """The items of countdown(3) on `channel`, then a terminal OK with body nil."""
    items = []
    while True:
        frame = conn.wait_for(lambda f: f.channel == channel, what)
        if frame.flags & EOS:
            if frame.result["code"] != 0 or frame.result["body"] is not None:
                fail("%s: %s ended %r, want OK with body nil" % (kind, what, frame.result))
            break
        items.append(u32_item(frame.payload))
    if items != [3, 2, 1]:
        fail("%s: %s gave %r, want [3, 2, 1]" % (kind, what, items))


def check_deadline(conn, kind):
    """§6.2: Unix carries deadline_ns (CLOCK_MONOTONIC), TCP the metadata; both answer
    DEADLINE_EXCEEDED well before the 10 s sleep ends."""
    started = time.monotonic()
    if kind == "unix":
        deadline = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 200_000_000
        c = conn.start_call(ECHO["sleep"], Writer().u32(10000).bytes(), deadline=deadline)
        how = "deadline_ns"
    else:
        c = conn.start_call(ECHO["sleep"], Writer().u32(10000).bytes(),
                            metadata=[("rapace.deadline_remaining_ms", struct.pack("<I", 200))])
        how = "rapace.deadline_remaining_ms"
    conn.expect_status(c, DEADLINE_EXCEEDED, "sleep(10000) with a 200 ms deadline", timeout=5)
    elapsed = time.monotonic() - started
    if elapsed < 0.15:
        fail("%s: DEADLINE_EXCEEDED after %.3f s, before the 200 ms deadline" % (kind, elapsed))
    if kind == "unix":
        # A deadline already past: answered at once.
        past = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - 1_000_000
        c = conn.start_call(ECHO["sleep"], Writer().u32(10000).bytes(), deadline=past)
        conn.expect_status(c, DEADLINE_EXCEEDED, "sleep(10000) with a past deadline_ns", timeout=5)
    ok("%s deadline via %s -> DEADLINE_EXCEEDED after %.2f s" % (kind, how, elapsed))


def check_pipelined(conn, kind):
    """Several calls written at once before any answer is read; answers matched by channel."""
    batch, expected = b"", {}
    for i in range(8):
        c, data = conn.call_frames(ECHO["add"], Writer().i32(i).i32(1000).bytes())
        batch += data
        expected[c] = ("add", i + 1000)
    c, data = conn.call_frames(ECHO["echo"], Writer().string("pipelined").bytes())
    batch += data
    expected[c] = ("echo", "pipelined")
    c, data = conn.call_frames(ECHO["sleep"], Writer().u32(50).bytes())
    batch += data
    expected[c] = ("sleep", b"")
    c, data = conn.call_frames(ECHO["blob"], Writer().u32(40).bytes())
    batch += data
    expected[c] = ("blob", bytes(i % 251 for i in range(40)))
    c, data = conn.call_frames(0xABCDEF01, b"")
    batch += data
    expected[c] = ("unknown", None)
    conn.send_raw(batch)
    order = []
    for _ in range(len(expected)):
        frame = conn.wait_for(lambda f: f.channel in expected and f.channel not in order, "pipelined answers")
        order.append(frame.channel)
        what, want = expected[frame.channel]
        result = frame.result
        if what == "unknown":
            if result["code"] != UNIMPLEMENTED:
                fail("%s: pipelined unknown method gave %r" % (kind, result))
            continue
        if result["code"] != 0:
            fail("%s: pipelined %s on channel %d failed: %r" % (kind, what, frame.channel, result))
        body = result["body"]
        got = {"add": lambda: decode_all(body, Reader.i32), "echo": lambda: decode_all(body, Reader.string),
               "sleep": lambda: body, "blob": lambda: decode_all(body, Reader.byte_buf)}[what]()
        if got != want:
            fail("%s: pipelined %s on channel %d returned %r, want %r" % (kind, what, frame.channel, got, want))
    ok("%s %d pipelined calls in one write, answers matched by channel (arrival order %s)" % (
        kind, len(expected), "in order" if order == sorted(order) else "interleaved"))


def check_protocol_error(kind, address):
    """A second connection: an unknown verb below 100 is a protocol error: GoAway
    protocolError, then close (§4). Also shows the server serves a new connection."""
    conn = Conn(kind, address, kind + "#2")
    handshake(conn)
    c = conn.start_call(ECHO["add"], Writer().i32(20).i32(22).bytes())
    if decode_all(conn.expect_ok(c, "add on a second connection"), Reader.i32) != 42:
        fail("%s: add(20, 22) on a second connection" % kind)
    conn.control(50, b"")
    try:
        frame = conn.read_frame(5.0)
    except (TimeoutError, Closed) as e:
        fail("%s: unknown verb 50: no GoAway (%s)" % (kind, type(e).__name__))
    if frame.channel != 0 or frame.method != GO_AWAY or frame.goaway["reason"] != GOAWAY_PROTOCOL_ERROR:
        fail("%s: unknown verb 50 answered %r %s, want GoAway protocolError" % (kind, frame, frame.payload.hex()))
    # Spec 6.4 defines last_channel_id for shutdown; the project fills it in every GoAway.
    if frame.goaway["last"] != 1:
        fail("%s: GoAway last_channel_id %d, want 1 (the highest channel we opened)" % (kind, frame.goaway["last"]))
    try:
        extra = conn.read_frame(5.0)
        fail("%s: frame after GoAway(protocolError): %r" % (kind, extra))
    except TimeoutError:
        fail("%s: the server did not close within 5 s after GoAway(protocolError)" % kind)
    except Closed:
        pass
    conn.close()
    ok("%s unknown control verb 50 -> GoAway protocolError %r, then close" % (kind, frame.goaway["message"]))


def read_until_close(conn, what, timeout=5.0):
    """Frames until EOF (each bounded by `timeout`); fails if the server keeps it open."""
    frames = []
    while True:
        try:
            frames.append(conn.read_frame(timeout))
        except TimeoutError:
            fail("%s: the server did not close the connection within %.0f s after %s (got %r)" % (conn.name, timeout, what, frames))
        except Closed:
            conn.close()
            return frames


def check_handshake(kind, address):
    """§5: the server's Hello comes without waiting for ours; a Hello of another major
    version, of the same role, requiring a feature we lack or not supporting bit 1, or a
    first frame that is not a Hello, is rejected: CloseChannel { 0, error(why) }, close.
    Another minor version is accepted."""
    conn = Conn(kind, address, kind + " unprompted")
    frame = conn.next_frame(what="the server's Hello before ours")
    if frame.channel != 0 or frame.method != HELLO or frame.msg_id != 1:
        fail("%s: the server's first frame, before we sent anything, is %r" % (kind, frame))
    conn.close()
    cases = [
        ("major version 2", HELLO, encode_hello(0, 0x2, 0xE, (0, 0, 0), [], [], version=0x00020000)),
        ("role acceptor", HELLO, encode_hello(1, 0x2, 0xE, (0, 0, 0), [], [])),
        ("required bit 0", HELLO, encode_hello(0, 0x3, 0xF, (0, 0, 0), [], [])),
        ("no call envelope", HELLO, encode_hello(0, 0x0, 0x0, (0, 0, 0), [], [])),
        ("duplicate methods", HELLO, encode_hello(0, 0x2, 0xE, (0, 0, 0), [(7, bytes(32), None)] * 2, [])),
        # Spec 5 asks only for a close here; the project rejects like a bad Hello.
        ("Ping first", PING, b"12345678"),
    ]
    for what, verb, payload in cases:
        conn = Conn(kind, address, "%s %s" % (kind, what))
        conn.control(verb, payload)
        frames = read_until_close(conn, "a Hello with " + what)
        if len(frames) != 2 or frames[0].method != HELLO or frames[1].method != CLOSE_CHANNEL or \
                frames[1].close[0] != 0 or frames[1].close[1] is None:
            fail("%s: %s answered %r, want the server's Hello, CloseChannel { 0, error(why) }, close" % (kind, what, frames))
    conn = Conn(kind, address, kind + " minor 5")
    conn.control(HELLO, encode_hello(0, 0x2, 0xE, (0, 0, 0), [], [], version=0x00010005))
    frame = conn.next_frame(what="the server's Hello")
    c = conn.start_call(ECHO["add"], Writer().i32(1).i32(2).bytes())
    if frame.method != HELLO or decode_all(conn.expect_ok(c, "add after a minor-5 Hello"), Reader.i32) != 3:
        fail("%s: a Hello of version 1.5 was not accepted" % kind)
    conn.close()
    ok("%s handshake: Hello sent unprompted; %d bad Hellos rejected with CloseChannel { 0, error }; minor 5 accepted" % (kind, len(cases)))


def check_framing_errors(kind, address):
    """§8.1: a length below 64, payload_len ≠ length − 64, an 11-byte length varint, a
    payload above the max payload → protocol error: GoAway protocolError, close."""
    ping = encode_frame(Frame(2, 0, PING, CONTROL, b"12345678"))
    cases = [
        ("a length below 64", encode_varint(10) + bytes(10)),
        ("payload_len != length - 64", ping[:29] + bytes([9]) + ping[30:]),
        ("an 11-byte length varint", bytes([0x80] * 10 + [0x01])),
        ("a payload above the max payload", encode_varint(64 + (17 << 20)) + bytes(64)),
    ]
    for what, data in cases:
        conn = Conn(kind, address, "%s %s" % (kind, what))
        handshake(conn)
        conn.send_raw(data)
        frames = read_until_close(conn, what)
        # Spec 8.1: "closes the connection with a protocol error"; the project says it with GoAway.
        if len(frames) != 1 or frames[0].method != GO_AWAY or frames[0].goaway["reason"] != GOAWAY_PROTOCOL_ERROR:
            fail("%s: %s answered %r, want GoAway protocolError then close" % (kind, what, frames))
    ok("%s framing errors (%d kinds) -> GoAway protocolError, close" % (kind, len(cases)))


class SilentConnection(threading.Thread):
    """A connection that sends `sent` (nothing, or the start of a Hello) and never a whole
    Hello, opened before the other checks: a thread records what the server sends and when
    it closes, so that the handshake timeout (§5, 5 s by default) runs while they do."""

    def __init__(self, kind, address, what, sent, limit):
        super().__init__(daemon=True)
        self.conn = Conn(kind, address, "%s %s" % (kind, what))
        self.what, self.limit = what, limit
        self.opened = time.monotonic()
        self.received = bytearray()
        self.closed_after = None
        self.error = None
        if sent:
            self.conn.send_raw(sent)
        self.start()

    def run(self):
        deadline = self.opened + self.limit
        sock = self.conn.sock
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(1 << 16)
                except socket.timeout:
                    return
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    self.closed_after = time.monotonic() - self.opened
                    return
                self.received += chunk
        except OSError as e:
            self.error = e


def open_silent_connections(kind, address):
    """Opened first, checked last (check_handshake_timeout)."""
    hello = encode_frame(Frame(1, 0, HELLO, CONTROL, our_hello()))
    return [SilentConnection(kind, address, "silent", b"", HANDSHAKE_CLOSE_BY),
            SilentConnection(kind, address, "half a Hello", hello[:len(hello) // 2], HANDSHAKE_CLOSE_BY)]


def check_handshake_timeout(kind, silent):
    """§5: no Hello within the handshake timeout (5 s by default) → close. A connection that
    sends nothing, and one that sends only part of its Hello, are closed after about 5 s:
    not before HANDSHAKE_NOT_BEFORE, and by HANDSHAKE_CLOSE_BY. What the server sends
    meanwhile: its Hello (sent without waiting, §5) and, a project choice
    (Docs/protocol-notes.md, Handshake), CloseChannel { 0, error(why) } before it closes."""
    for watch in silent:
        watch.join(max(0.0, watch.opened + watch.limit - time.monotonic()) + 1.0)
        name = watch.conn.name
        if watch.is_alive():
            fail("%s: the reader of the connection did not end" % name)
        if watch.error is not None:
            fail("%s: socket error: %s" % (name, watch.error))
        if watch.closed_after is None:
            fail("%s: the server did not close the connection within %.0f s (handshake timeout 5 s)" % (name, watch.limit))
        if watch.closed_after < HANDSHAKE_NOT_BEFORE:
            fail("%s: the server closed the connection after %.2f s, before its 5 s handshake timeout" % (name, watch.closed_after))
        conn = watch.conn
        conn.buffer, conn.eof = bytearray(watch.received), True
        frames = []
        while True:
            try:
                frames.append(conn.read_frame(0.1))
            except Closed:
                break
        conn.close()
        if len(frames) != 2 or frames[0].method != HELLO or frames[0].msg_id != 1 or \
                frames[1].method != CLOSE_CHANNEL or frames[1].close[0] != 0 or frames[1].close[1] is None:
            fail("%s: the server sent %r before closing, want its Hello, then CloseChannel { 0, error(why) }" % (name, frames))
    ok("%s handshake timeout: %s closed after %s s, each after the server's Hello and CloseChannel { 0, error }" % (
        kind, " and ".join(w.what for w in silent), " and ".join("%.1f" % w.closed_after for w in silent)))


def check_keepalive(kind, address, interval, timeout):
    """§4 Ping from a server run with `--keepalive INTERVAL --keepalive-timeout TIMEOUT`
    (Docs/protocol-notes.md, Keepalive: a Ping INTERVAL after the handshake and after each
    matching Pong, only when both peers support the ping feature (bit 3); no Pong within
    TIMEOUT closes the session, no GoAway). Four connections at once:
    - `answering` answers every Ping with the same 8 bytes for 1.5 × TIMEOUT and stays up
      (a call works after it); no Ping comes sooner than INTERVAL after our Pong;
    - `unanswered` never answers: no second Ping, no GoAway, closed after about TIMEOUT;
    - `wrong pong` answers with other bytes: the same, the Pong does not match;
    - `no ping feature` (a Hello without bit 3) gets no Ping at all and stays up."""
    answering = Conn(kind, address, kind + " keepalive answering")
    unanswered = Conn(kind, address, kind + " keepalive unanswered")
    wrong = Conn(kind, address, kind + " keepalive wrong pong")
    no_feature = Conn(kind, address, kind + " keepalive no ping feature")
    for conn in (answering, unanswered, wrong):
        handshake(conn)
    no_feature.control(HELLO, encode_hello(0, 0x2, 0x6, (16 << 20, 0, 0), [], []))
    frame = no_feature.next_frame(what="the server's Hello")
    if frame.method != HELLO:
        fail("%s: first server frame is not a Hello: %r" % (no_feature.name, frame))
    if not frame.hello["supported"] & 0x8:
        fail("%s: a server run with --keepalive does not support the ping feature (bit 3): %r" % (kind, frame.hello))
    started = time.monotonic()
    span = 1.5 * timeout
    pongs = []            # (when we answered, when the next Ping came) on `answering`
    last_pong = None
    pinged = {}           # conn -> (when its first Ping arrived, its payload)
    closed = {}           # conn -> when the server closed it
    live = [answering, unanswered, wrong, no_feature]
    limit = started + span + timeout + 5.0
    while (unanswered not in closed or wrong not in closed or time.monotonic() - started < span) and time.monotonic() < limit:
        readable, _, _ = select.select([c.sock for c in live if c not in closed], [], [], 0.05)
        for conn in [c for c in live if c.sock in readable]:
            try:
                conn.fill(time.monotonic() + 0.5)
            except TimeoutError:
                continue
            while True:
                try:
                    frame = conn.read_frame(0.0001) if conn.buffer or conn.eof else None
                except TimeoutError:
                    frame = None
                except Closed:
                    closed[conn] = time.monotonic()
                    break
                if frame is None:
                    break
                now = time.monotonic()
                is_ping = frame.channel == 0 and frame.method == PING
                if conn is answering and is_ping:
                    if last_pong is not None:
                        pongs.append((last_pong, now))
                    conn.control(PONG, frame.payload)
                    last_pong = time.monotonic()
                elif conn in (unanswered, wrong) and is_ping and conn not in pinged:
                    pinged[conn] = (now, frame.payload)
                    if conn is wrong:
                        conn.control(PONG, bytes(b ^ 0xFF for b in frame.payload))
                else:
                    fail("%s: unexpected %r %s (%.2f s after the handshakes)" % (conn.name, frame, frame.payload.hex(), now - started))
    for conn in (unanswered, wrong):
        if conn not in pinged:
            fail("%s: no Ping within %.1f s of the handshake (keepalive interval %.1f s)" % (conn.name, limit - started, interval))
        if conn not in closed:
            fail("%s: the server kept the connection %.1f s after a Ping we %s (keepalive timeout %.1f s)" % (
                conn.name, limit - pinged[conn][0], "never answered" if conn is unanswered else "answered with other bytes", timeout))
        # Not sooner than the timeout; half of it, since the Ping may have reached us late.
        after = closed[conn] - pinged[conn][0]
        if after < timeout / 2:
            fail("%s: closed %.2f s after the Ping, before the %.1f s keepalive timeout" % (conn.name, after, timeout))
        conn.close()
    if answering in closed or no_feature in closed:
        fail("%s: the server closed a connection that %s" % (
            kind, "answered every Ping" if answering in closed else "does not support the ping feature"))
    if len(pongs) < 2:
        fail("%s: %d Pings in %.1f s with a keepalive interval of %.1f s" % (answering.name, len(pongs) + (last_pong is not None), span, interval))
    early = [next_ping - pong for pong, next_ping in pongs if next_ping - pong < interval - 0.02]
    if early:
        fail("%s: a Ping came %.3f s after our Pong, sooner than the %.1f s interval" % (answering.name, min(early), interval))
    for conn in (answering, no_feature):
        c = conn.start_call(ECHO["echo"], Writer().string("still here").bytes())
        if decode_all(conn.expect_ok(c, "echo after %.1f s of keepalive" % span), Reader.string) != "still here":
            fail("%s: echo after the keepalive checks" % conn.name)
        conn.close()
    ok("%s keepalive: Pings answered with the same 8 bytes keep the connection (%d Pings in %.1f s, none sooner than %.1f s after a Pong); "
       "an unanswered Ping and a Pong with other bytes close it after %.1f s and %.1f s (no GoAway); no Ping without the ping feature" % (
           kind, len(pongs) + 1, span, interval, closed[unanswered] - pinged[unanswered][0], closed[wrong] - pinged[wrong][0]))


def check_sigterm(kind, address, pid):
    """§6.4 from the server's side (rapace-echo sends GoAway on SIGTERM): GoAway { shutdown,
    last_channel_id = our highest channel }, a channel opened after it is refused with
    CancelChannel { C, resourceExhausted }, the call in flight finishes, then close."""
    conn = Conn(kind, address, kind + " sigterm")
    handshake(conn)
    c = conn.start_call(ECHO["echo"], Writer().string("before").bytes())
    conn.expect_ok(c, "echo before SIGTERM")
    # Long enough that the GoAway comes first on a loaded machine, well inside the server's
    # 5 s grace for calls in flight.
    sleeping = conn.start_call(ECHO["sleep"], Writer().u32(2500).bytes())
    conn.expect_silence(0.1, "the sleep before SIGTERM")
    os.kill(pid, 15)
    frame = conn.next_frame(what="GoAway after SIGTERM")
    if frame.channel != 0 or frame.method != GO_AWAY or frame.goaway["reason"] != GOAWAY_SHUTDOWN or frame.goaway["last"] != sleeping:
        fail("%s: after SIGTERM got %r %r, want GoAway { shutdown, last_channel_id %d }" % (kind, frame, getattr(frame, "goaway", None), sleeping))
    late = conn.start_call(ECHO["echo"], Writer().string("late").bytes())
    refused = conn.wait_for(lambda f: f.channel == 0 and f.method == CANCEL_CHANNEL, "CancelChannel for a channel opened after GoAway")
    if refused.cancel != (late, CANCEL_RESOURCE):
        fail("%s: channel %d opened after GoAway answered CancelChannel%r, want resourceExhausted" % (kind, late, refused.cancel))
    conn.cancelled.add(late)
    if conn.expect_ok(sleeping, "the sleep in flight at SIGTERM") != b"":
        fail("%s: the sleep in flight did not finish with a unit result" % kind)
    frames = read_until_close(conn, "its GoAway and the last call")
    if frames:
        fail("%s: frames after the last call of a server going away: %r" % (kind, frames))
    ok("%s SIGTERM: GoAway shutdown (last_channel_id %d), later channel refused resourceExhausted, call in flight finished, close" % (kind, sleeping))


class Usage(argparse.ArgumentParser):
    def error(self, message):
        fail("usage: %s (%s)" % (self.format_usage().strip(), message))


def main():
    parser = Usage(prog="stream_peer.py")
    parser.add_argument("kind", choices=("tcp", "unix"))
    parser.add_argument("address", help="HOST:PORT (tcp) or PATH (unix) of rapace-echo serve")
    parser.add_argument("vectors", nargs="?", default=VECTORS)
    parser.add_argument("--sigterm", type=int, metavar="SERVER_PID")
    parser.add_argument("--keepalive", metavar="ADDRESS", help="a rapace-echo serve run with --keepalive")
    parser.add_argument("--keepalive-interval", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--keepalive-timeout", type=float, default=2.0, metavar="SECONDS")
    arguments = parser.parse_args()
    kind, address = arguments.kind, arguments.address
    frames = check_vectors(arguments.vectors)
    try:
        silent = open_silent_connections(kind, address)
        check_session(kind, address, frames)
        check_protocol_error(kind, address)
        check_handshake(kind, address)
        check_framing_errors(kind, address)
        if arguments.keepalive is not None:
            check_keepalive(kind, arguments.keepalive, arguments.keepalive_interval, arguments.keepalive_timeout)
        check_handshake_timeout(kind, silent)
        if arguments.sigterm is not None:
            check_sigterm(kind, address, arguments.sigterm)
    except OSError as e:
        fail("%s: socket error: %s" % (kind, e))
    except DecodeError as e:
        fail("%s: a server payload does not decode: %s" % (kind, e))
    except Exception as e:  # a bug in the peer: still a FAIL line, not only a traceback
        fail("%s: peer error %s: %s" % (kind, type(e).__name__, e))
    ok("%s all checks passed" % kind)


if __name__ == "__main__":
    main()
