#!/usr/bin/env python3
"""An example application backend for the gateway's upstream calls (PROTOCOL.md section 10).

Python standard library only. The gateway POSTs each event listed in the endpoint's
`[endpoint.upstream] events` to URL/EVENT; this server answers:

  connect     admits the user named by the `session` cookie (or, for WebTransport, whose
              browsers send no cookies, the `session` query parameter): 200 with `user`,
              rooms to `join`, and `data` for `welcome`; 401 without a session; 403 for a
              banned user
  join        403 for rooms named `private.*`; otherwise 200 with a topic as the ack's `data`
  publish     403 for text containing a banned word, 400 for empty text; otherwise rewrites
              the message: text trimmed, `name` set to the sender, server time `at` stamped
  rpc         `time`, `echo`, `whoami`, `sleep` (for trying timeouts); others 404
  disconnect  logged

It checks `Authorization: Bearer <secret>` on every call. One log line per call on stdout.

A `session` value here is simply the user's name: a toy. A real application would look
an opaque session id up in its session store, and give its page a short-lived signed token
for the WebTransport query.

    python3 examples/backend/backend.py [--listen 127.0.0.1:9000] [--secret S]

The secret defaults to $BACKEND_SECRET, else "dev-backend-secret" (as in gateway.toml).
"""

import argparse
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

PREFIX = "/gateway/"
NAME = re.compile(r"[\w .-]{1,32}")
BANNED_USERS = {"mallory"}
BANNED_WORDS = ("spam",)
MAX_TEXT = 500


class Refusal(Exception):
    """A 4xx answer whose `reason` the gateway passes on to the client."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


LOG_LOCK = threading.Lock()


def say(line, stream=sys.stdout):
    """Prints one whole line (calls run on many threads at once)."""
    with LOG_LOCK:
        stream.write(line + "\n")
        stream.flush()


def log(event, body, **extra):
    fields = {"user": body.get("user"), "transport": body.get("transport"), **extra}
    say(event + " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None))


def session_of(body):
    """The user named by the `session` cookie, else by the `session` query parameter."""
    value = None
    for pair in body.get("headers", {}).get("cookie", "").split(";"):
        name, _, cookie = pair.strip().partition("=")
        if name == "session":
            value = unquote(cookie.strip('"'))
    if value is None:
        value = body.get("query", {}).get("session")
    if value is None:
        raise Refusal(401, "no session: set the cookie session=<your name> (WebTransport: ?session=<your name>)")
    value = value.strip()
    if not NAME.fullmatch(value):
        raise Refusal(401, "a session names a user: 1 to 32 letters, digits, spaces, _ . -")
    return value


def on_connect(body):
    if body.get("refresh"):
        # An `auth` frame on the open session: its `token` is a session value again.
        user = body.get("token")
        if user != body.get("user"):
            raise Refusal(401, "that session names another user")
        log("refresh", body)
        return {"user": user}
    user = session_of(body)
    if user in BANNED_USERS:
        raise Refusal(403, f"{user} is banned")
    log("connect", body, user=user, remote=body.get("remote_addr"))
    return {
        "user": user,
        "join": ["lobby"],
        "data": {"name": user, "greeting": f"Welcome, {user}!", "rooms": ["lobby"]},
    }


def on_join(body):
    room = body.get("room", "")
    if room.startswith("private."):
        raise Refusal(403, "private rooms are invite-only")
    log("join", body, room=room)
    return {"data": {"topic": f"{room}: be kind"}}


def on_publish(body):
    data = body.get("data")
    if "data_b64" in body or not isinstance(data, dict) or not isinstance(data.get("text"), str):
        return {}  # not a chat line (binary, or e.g. the demo's {"kind": "hello"}): as sent
    text = " ".join(data["text"].split())
    if not text:
        raise Refusal(400, "empty message")
    if len(text) > MAX_TEXT:
        raise Refusal(413, f"messages are at most {MAX_TEXT} characters")
    lowered = text.lower()
    for word in BANNED_WORDS:
        if word in lowered:
            raise Refusal(403, f"messages about {word} are not allowed here")
    log("publish", body, room=body.get("room"))
    return {"data": {**data, "text": text, "name": body.get("user"), "at": int(time.time() * 1000)}}


def on_rpc(body):
    method, data = body.get("method"), body.get("data")
    log("rpc", body, method=method, data=json.dumps(data, separators=(",", ":"))[:100])
    if method == "time":
        now = time.time()
        return {"data": {"now": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "unix_ms": int(now * 1000)}}
    if method == "echo":
        return {"data": data}
    if method == "whoami":
        return {"data": {k: body.get(k) for k in ("user", "session", "transport", "endpoint", "node")}}
    if method == "sleep":
        ms = data.get("ms", 0) if isinstance(data, dict) else 0
        ms = max(0, min(int(ms) if isinstance(ms, (int, float)) else 0, 10000))
        time.sleep(ms / 1000)
        return {"data": {"slept_ms": ms}}
    raise Refusal(404, f"unknown method {method}")


def on_disconnect(body):
    log("disconnect", body, code=body.get("code"), duration_ms=body.get("duration_ms"))
    return {}


HANDLERS = {
    "connect": on_connect,
    "join": on_join,
    "publish": on_publish,
    "rpc": on_rpc,
    "disconnect": on_disconnect,
}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The gateway opens a connection per concurrent call (HTTP/1.1): the default listen
    # backlog of 5 would drop connection attempts beyond it, delaying them by a SYN retry.
    request_queue_size = 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the gateway pools its connections
    server_version = "example-backend"
    secret = ""

    def do_POST(self):
        body = self.read_body()
        if body is None:
            return
        status, payload = self.handle_call(body)
        try:
            self.answer(status, payload)
        except OSError:
            # The gateway gave up on this call (its timeout_ms) and closed the connection.
            say(f"{self.path}: the gateway left before the answer", sys.stderr)
            self.close_connection = True

    def handle_call(self, body):
        """The status and JSON body answering a call."""
        if self.secret and self.headers.get("Authorization") != f"Bearer {self.secret}":
            say(f"refused a call to {self.path} without the gateway's secret", sys.stderr)
            return 401, {"reason": "bad backend secret"}
        handler = HANDLERS.get(self.path[len(PREFIX):]) if self.path.startswith(PREFIX) else None
        if handler is None:
            return 404, {"reason": f"no such event {self.path}"}
        try:
            parsed = json.loads(body)
        except ValueError:
            return 400, {"reason": "the body is not JSON"}
        if not isinstance(parsed, dict):
            return 400, {"reason": "the body is not a JSON object"}
        try:
            return 200, handler(parsed)
        except Refusal as refusal:
            return refusal.status, {"reason": refusal.reason}
        except Exception as error:  # a bug here: the gateway counts a 5xx as a failure
            say(f"error in {self.path}: {error!r}", sys.stderr)
            return 500, {"reason": "internal error"}

    def do_GET(self):
        self.read_body()
        self.answer(404, {"reason": "POST /gateway/EVENT only"})

    def read_body(self):
        """The request body (Content-Length or chunked), or None after a 400 answer."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            self.answer(400, {"reason": "bad Content-Length"})
            return None
        return self.rfile.read(length) if length > 0 else b""

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # one line per call is logged by the handlers instead


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--secret", default=os.environ.get("BACKEND_SECRET", "dev-backend-secret"),
                        help="expected in Authorization: Bearer <secret> ('' to accept any call)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    Handler.secret = args.secret
    server = Server((host, int(port)), Handler)
    say(f"backend listening on http://{host}:{server.server_address[1]}{PREFIX.rstrip('/')}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
