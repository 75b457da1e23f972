#!/usr/bin/env python3
"""Interop peer for rapace's WebSocket transport, built on the `websockets` package
(an independent, strict RFC 6455 implementation).

  ws_peer.py client PORT   talk rapace to our server: Hello, ping, a fragmented Echo.add
                           call, a clean close (1000), then a text message (expects 1003)
  ws_peer.py server        print the port, accept one connection, echo 3 binary messages
                           back in 3 fragments each, ping, then close with 4001

Prints `OK ...` lines; exits 1 with `FAIL ...` on any mismatch.
"""
import json
import os
import sys
import threading

try:
    from websockets.sync.client import connect
    from websockets.sync.server import serve
    from websockets.exceptions import ConnectionClosed
except ImportError:
    print("FAIL python package `websockets` is missing (tools/test installs it)", flush=True)
    sys.exit(2)

VECTORS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "spec", "vectors.json")


def fail(message):
    print("FAIL " + message, flush=True)
    sys.exit(1)


def stream_vector(frames, prefix):
    for name, hexed in frames.items():
        if name.startswith(prefix):
            raw = bytes.fromhex(hexed)
            # strip the spec 8.1 length varint (stream framing) to get the WebSocket message
            i = 0
            while raw[i] & 0x80:
                i += 1
            return raw[i + 1:]
    fail("vector %r missing" % prefix)


def channel(message):
    return int.from_bytes(message[8:12], "little")


def run_client(port, vectors_path):
    with open(vectors_path) as f:
        frames = json.load(f)["frames"]
    hello = stream_vector(frames, "initiator Hello")
    open_channel = stream_vector(frames, "OpenChannel(1, Call)")
    add = stream_vector(frames, "Echo.add(2, 3) request")
    ws_vector = next(bytes.fromhex(v) for k, v in frames.items() if k.startswith("WebSocket binary message"))
    if ws_vector != add:
        fail("the WebSocket vector differs from the stream vector without its prefix")
    uri = "ws://127.0.0.1:%d/" % port
    with connect(uri, compression=None, open_timeout=5, close_timeout=5) as ws:
        ws.send(hello)
        reply = ws.recv(timeout=5)
        if not isinstance(reply, bytes) or len(reply) < 64 or channel(reply) != 0:
            fail("expected the server's Hello on channel 0, got %r" % (reply[:16],))
        print("OK hello", flush=True)
        if not ws.ping(b"rapace").wait(5):
            fail("no pong")
        print("OK ping", flush=True)
        ws.send(open_channel)
        ws.send([add[:10], add[10:64], add[64:]])  # one message in three fragments
        for _ in range(10):
            message = ws.recv(timeout=5)
            if channel(message) == 1:
                payload = message[64:]
                if payload[-2:] != b"\x01\x0a":
                    fail("Echo.add response payload %s does not carry Ok(5)" % payload.hex())
                print("OK call add(2,3) -> 5", flush=True)
                break
        else:
            fail("no response on channel 1")
        ws.close(1000, "done")
        if ws.close_code != 1000:
            fail("server answered close with %r" % ws.close_code)
        print("OK close 1000", flush=True)
    with connect(uri, compression=None, open_timeout=5, close_timeout=5) as ws:
        ws.send("text is not rapace")
        try:
            for _ in range(10):
                ws.recv(timeout=5)
            fail("server did not close after a text message")
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            if code != 1003:
                fail("text message closed with %r, want 1003" % code)
        print("OK text -> 1003", flush=True)


def run_server():
    done = threading.Event()

    def handler(ws):
        try:
            for _ in range(3):
                message = ws.recv(timeout=5)
                if not isinstance(message, bytes):
                    fail("got a text message")
                third = max(1, len(message) // 3)
                ws.send([message[:third], message[third:2 * third], message[2 * third:]])
            if not ws.ping(b"from-python").wait(5):
                fail("client did not answer ping")
            print("OK echoed 3 messages, ping answered", flush=True)
            ws.close(4001, "bye")
        finally:
            done.set()

    with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.socket.getsockname()[1]
        print("PORT %d" % port, flush=True)
        threading.Thread(target=lambda: (done.wait(30), server.shutdown()), daemon=True).start()
        server.serve_forever()
    print("OK server done", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "client":
        run_client(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else VECTORS)
    elif len(sys.argv) >= 2 and sys.argv[1] == "server":
        run_server()
    else:
        fail("usage: ws_peer.py client PORT [VECTORS] | server")
