#!/usr/bin/env python3
"""Fake OpenAI- and Anthropic-compatible LLM upstream for custos edge tests.

Standard library only. Serves, on 127.0.0.1:--port (0 = pick a free port):

  POST /v1/chat/completions   (OpenAI; streaming and non-streaming)
  POST /v1/embeddings         (OpenAI)
  POST /v1/responses          (OpenAI Responses API; streaming and non-streaming)
  POST /v1/messages           (Anthropic; streaming and non-streaming)
  GET  /v1/models             (OpenAI-style list)

Prints exactly one line "READY <port>" on stdout once listening, then serves
until killed. Every request (method, path, headers, JSON body) is appended as
one JSON line to --log FILE, if given.

Per-request control ("REPLY:" convention): if the text of the last user
message starts with "REPLY:", the rest is parsed as a JSON object that
overrides the defaults for that request only, e.g.

    REPLY:{"text":"Hello, world!","split":[5,7]}

Keys (all optional): text, split, byte_split, die_after, delay, status,
error, usage. If the rest is not a JSON object it is used verbatim as the
reply text. See tests/py/README.md for the details.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS: argparse.Namespace
LOG_LOCK = threading.Lock()


class Died(Exception):
    """Raised after the connection was closed on purpose (--die-after)."""


class ClientGone(Exception):
    """The downstream closed the connection while we were writing."""


# ---------------------------------------------------------------- helpers


def log_request(entry: dict) -> None:
    if not ARGS.log:
        return
    line = json.dumps(entry, ensure_ascii=False)
    with LOG_LOCK:
        with open(ARGS.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def content_text(content) -> str:
    """Text of an OpenAI / Anthropic / Responses message content value."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict):
                t = p.get("text")
                if isinstance(t, str):
                    parts.append(t)
        return "".join(parts)
    return ""


def all_message_texts(route: str, body: dict) -> list[tuple[str, str]]:
    """[(role, text)] for every input message of the request, in order."""
    out: list[tuple[str, str]] = []
    if route == "responses":
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(("user", inp))
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, dict) and "role" in item:
                    out.append((str(item.get("role")), content_text(item.get("content"))))
        if isinstance(body.get("instructions"), str):
            out.insert(0, ("system", body["instructions"]))
        return out
    if route == "messages" and body.get("system") is not None:
        out.append(("system", content_text(body.get("system"))))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            out.append((str(m.get("role")), content_text(m.get("content"))))
    return out


def last_user_text(route: str, body: dict) -> str:
    for role, text in reversed(all_message_texts(route, body)):
        if role == "user":
            return text
    return ""


def words(s: str) -> int:
    return len(s.split())


def split_points(text: str, points) -> list[str]:
    """Cut text at the given offsets (code-point offsets; == byte offsets for ASCII)."""
    n = len(text)
    if points is None:
        points = list(range(4, n, 4))
    cuts = sorted({int(p) for p in points if 0 < int(p) < n})
    pieces, prev = [], 0
    for c in cuts + [n]:
        pieces.append(text[prev:c])
        prev = c
    return [p for p in pieces if p != ""]


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class Plan:
    """What to answer for one request: defaults from argv, overridden by REPLY:."""

    def __init__(self, route: str, body: dict):
        self.text = ARGS.reply
        self.split = ARGS.split_points
        self.byte_split = ARGS.byte_split
        self.die_after = ARGS.die_after
        self.delay = ARGS.event_delay
        self.status = None
        self.error = None
        usage = None
        last = last_user_text(route, body)
        if last.startswith("REPLY:"):
            rest = last[len("REPLY:"):]
            try:
                d = json.loads(rest)
            except ValueError:
                d = None
            if isinstance(d, dict):
                self.text = str(d.get("text", self.text))
                if "split" in d:
                    self.split = d["split"]
                if "byte_split" in d:
                    self.byte_split = d["byte_split"]
                if "die_after" in d:
                    self.die_after = d["die_after"]
                if "delay" in d:
                    self.delay = float(d["delay"] or 0)
                self.status = d.get("status")
                self.error = d.get("error")
                usage = d.get("usage")
            else:
                self.text = rest
        self.deltas = split_points(self.text, self.split)
        prompt = sum(words(t) for _, t in all_message_texts(route, body))
        completion = words(self.text)
        if isinstance(usage, dict):
            prompt = int(usage.get("prompt_tokens", usage.get("input_tokens", prompt)))
            completion = int(usage.get("completion_tokens", usage.get("output_tokens", completion)))
        self.prompt_tokens = prompt
        self.completion_tokens = completion


class Streamer:
    """Writes SSE events as HTTP/1.1 chunks, flushing after every write."""

    def __init__(self, handler: "Handler", plan: Plan):
        self.h = handler
        self.plan = plan
        self.content_deltas = 0

    def start(self) -> None:
        h = self.h
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("X-Upstream", "custos-test-llm")
        h.end_headers()
        self._flush()

    def _flush(self) -> None:
        try:
            self.h.wfile.flush()
        except OSError as e:
            raise ClientGone() from e

    def _chunk(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.h.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        except OSError as e:
            raise ClientGone() from e
        self._flush()

    def raw(self, payload: bytes) -> None:
        k = self.plan.byte_split
        if k is not None and 0 < int(k) < len(payload):
            k = int(k)
            self._chunk(payload[:k])
            if ARGS.split_delay > 0:
                time.sleep(ARGS.split_delay)
            self._chunk(payload[k:])
        else:
            self._chunk(payload)
        if self.plan.delay and self.plan.delay > 0:
            time.sleep(self.plan.delay)

    def event(self, obj, name: str | None = None) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
        self.raw(text.encode("utf-8"))

    def maybe_die(self) -> None:
        """Call before each content delta and once after the last one."""
        n = self.plan.die_after
        if n is not None and self.content_deltas == int(n):
            self.die()

    def content(self, obj, name: str | None = None) -> None:
        self.maybe_die()
        self.event(obj, name)
        self.content_deltas += 1

    def die(self) -> None:
        # Abrupt close: no terminating zero-length chunk, so the body is incomplete.
        try:
            self.h.wfile.flush()
        except OSError:
            pass
        try:
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.h.close_connection = True
        raise Died()

    def end(self) -> None:
        try:
            self.h.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            raise ClientGone() from e
        self._flush()


# ---------------------------------------------------------------- handler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "custos-test-llm/1.0"

    def log_message(self, fmt, *args):  # keep stdout clean (READY line only)
        if ARGS.verbose:
            sys.stderr.write("llm_upstream: " + (fmt % args) + "\n")

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    # -- request plumbing

    def read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            data = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers
                    while True:
                        t = self.rfile.readline()
                        if t in (b"\r\n", b"\n", b""):
                            break
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send_json(self, status: int, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Upstream", "custos-test-llm")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="custos-test-llm"')
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def openai_error(self, status: int, message: str, etype: str, code=None) -> None:
        self.send_json(status, {"error": {"message": message, "type": etype, "param": None, "code": code}})

    def anthropic_error(self, status: int, message: str, etype: str) -> None:
        # Anthropic shape ({"type":"error","error":{type,message}}) that is also
        # OpenAI-shaped (error.message / error.type / error.code).
        self.send_json(status, {"type": "error", "error": {"type": etype, "message": message, "code": etype}})

    def authorized(self, route: str) -> bool:
        bearer = self.headers.get("Authorization") or ""
        xkey = self.headers.get("x-api-key")
        ok_bearer = bearer == f"Bearer {ARGS.key}"
        ok_xkey = xkey == ARGS.key
        if route == "messages":
            return ok_xkey
        if route == "models":
            return ok_bearer or ok_xkey
        return ok_bearer

    def handle_any(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        raw = self.read_body() if method in ("POST", "PUT", "PATCH") else b""
        body = None
        raw_text = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                raw_text = raw.decode("utf-8", "replace")
        entry = {
            "ts": time.time(),
            "method": method,
            "path": self.path,
            "headers": {},
            "body": body,
        }
        for k, v in self.headers.items():
            k = k.lower()
            entry["headers"][k] = v if k not in entry["headers"] else entry["headers"][k] + ", " + v
        if raw_text is not None:
            entry["raw_body"] = raw_text
        log_request(entry)

        routes = {
            ("POST", "/v1/chat/completions"): "chat",
            ("POST", "/v1/embeddings"): "embeddings",
            ("POST", "/v1/responses"): "responses",
            ("POST", "/v1/messages"): "messages",
            ("GET", "/v1/models"): "models",
        }
        route = routes.get((method, path.rstrip("/") or "/"))
        if route is None:
            self.openai_error(404, f"Unknown route {method} {path}", "invalid_request_error", "unknown_url")
            return
        if not self.authorized(route):
            if route == "messages":
                self.anthropic_error(401, "invalid x-api-key", "authentication_error")
            else:
                self.openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return
        if route == "models":
            self.do_models()
            return
        if not isinstance(body, dict):
            self.openai_error(400, "Request body must be a JSON object.", "invalid_request_error")
            return
        plan = Plan(route, body)
        if plan.status is not None:
            msg = plan.error or f"upstream forced status {plan.status}"
            if route == "messages":
                self.anthropic_error(int(plan.status), msg, "api_error")
            else:
                self.openai_error(int(plan.status), msg, "api_error", "forced")
            return
        try:
            getattr(self, "do_" + route)(body, plan)
        except Died:
            return
        except ClientGone:
            self.close_connection = True
            return

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_DELETE(self):
        self.handle_any("DELETE")

    # -- routes

    def do_models(self) -> None:
        now = int(time.time())
        self.send_json(200, {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": now, "owned_by": "custos-test"} for m in ARGS.models],
        })

    def do_embeddings(self, body: dict, plan: Plan) -> None:
        inp = body.get("input")
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            inputs = [inp]  # one token array
        elif isinstance(inp, list):
            inputs = inp
        else:
            self.openai_error(400, "'input' is required", "invalid_request_error")
            return
        vec = [0.1, 0.2, 0.3]
        data = []
        for i, _ in enumerate(inputs):
            emb: object = vec
            if body.get("encoding_format") == "base64":
                import array
                import base64
                emb = base64.b64encode(array.array("f", vec).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = sum(words(x) if isinstance(x, str) else len(x) for x in inputs)
        self.send_json(200, {
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-3-small"),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        })

    def usage_openai(self, plan: Plan) -> dict:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        }

    def do_chat(self, body: dict, plan: Plan) -> None:
        model = body.get("model", "gpt-4o-mini")
        cid = new_id("chatcmpl-")
        created = int(time.time())
        if not body.get("stream"):
            self.send_json(200, {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_custos_test",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": plan.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }],
                "usage": self.usage_openai(plan),
            })
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish=None) -> dict:
            c = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_custos_test",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        s = Streamer(self, plan)
        s.start()
        s.event(chunk({"role": "assistant", "content": "", "refusal": None}))
        for d in plan.deltas:
            s.content(chunk({"content": d}))
        s.maybe_die()
        s.event(chunk({}, "stop"))
        if include_usage:
            s.event({
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_custos_test",
                "choices": [],
                "usage": self.usage_openai(plan),
            })
        s.event("[DONE]")
        s.end()

    def response_obj(self, rid: str, mid: str, model: str, created: int, plan: Plan, done: bool) -> dict:
        output = []
        if done:
            output = [{
                "type": "message",
                "id": mid,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": plan.text, "annotations": [], "logprobs": []}],
            }]
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": "completed" if done else "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "metadata": {},
            "usage": {
                "input_tokens": plan.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": plan.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": plan.prompt_tokens + plan.completion_tokens,
            } if done else None,
        }

    def do_responses(self, body: dict, plan: Plan) -> None:
        model = body.get("model", "gpt-4o-mini")
        rid, mid, created = new_id("resp_"), new_id("msg_"), int(time.time())
        if not body.get("stream"):
            self.send_json(200, self.response_obj(rid, mid, model, created, plan, True))
            return
        seq = [0]

        def ev(name: str, obj: dict, content: bool = False) -> None:
            obj = {"type": name, "sequence_number": seq[0], **obj}
            seq[0] += 1
            (s.content if content else s.event)(obj, name)

        s = Streamer(self, plan)
        s.start()
        ev("response.created", {"response": self.response_obj(rid, mid, model, created, plan, False)})
        ev("response.in_progress", {"response": self.response_obj(rid, mid, model, created, plan, False)})
        ev("response.output_item.added", {"output_index": 0, "item": {
            "type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}})
        ev("response.content_part.added", {"item_id": mid, "output_index": 0, "content_index": 0,
                                           "part": {"type": "output_text", "text": "", "annotations": []}})
        for d in plan.deltas:
            ev("response.output_text.delta", {"item_id": mid, "output_index": 0, "content_index": 0,
                                              "delta": d, "logprobs": []}, content=True)
        s.maybe_die()
        ev("response.output_text.done", {"item_id": mid, "output_index": 0, "content_index": 0,
                                         "text": plan.text, "logprobs": []})
        ev("response.content_part.done", {"item_id": mid, "output_index": 0, "content_index": 0,
                                          "part": {"type": "output_text", "text": plan.text, "annotations": []}})
        final = self.response_obj(rid, mid, model, created, plan, True)
        ev("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
        ev("response.completed", {"response": final})
        s.end()

    def do_messages(self, body: dict, plan: Plan) -> None:
        model = body.get("model", "claude-3-5-haiku-latest")
        mid = new_id("msg_")
        if not body.get("stream"):
            self.send_json(200, {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": plan.text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens},
            })
            return
        s = Streamer(self, plan)
        s.start()
        s.event({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 1}}}, "message_start")
        s.event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start")
        s.event({"type": "ping"}, "ping")
        for d in plan.deltas:
            s.content({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}},
                      "content_block_delta")
        s.maybe_die()
        s.event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        s.event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                 "usage": {"output_tokens": plan.completion_tokens}}, "message_delta")
        s.event({"type": "message_stop"}, "message_stop")
        s.end()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--key", default="sk-upstream-test",
                   help="required API key (Bearer for OpenAI routes, x-api-key for /v1/messages)")
    p.add_argument("--log", help="append one JSON line per request to this file")
    p.add_argument("--reply", default="hello from upstream", help="reply text")
    p.add_argument("--split", default=None,
                   help="comma-separated offsets where one streamed delta ends and the next begins "
                        "(default: every 4 chars)")
    p.add_argument("--byte-split", type=int, default=None,
                   help="write every SSE event in two writes (two HTTP chunks) split at byte K")
    p.add_argument("--split-delay", type=float, default=0.02,
                   help="seconds to sleep between the two halves of a --byte-split event (default 0.02)")
    p.add_argument("--event-delay", type=float, default=0.0, help="seconds to sleep after every SSE event")
    p.add_argument("--die-after", type=int, default=None,
                   help="streaming only: close the connection abruptly after N content deltas")
    p.add_argument("--models", default="gpt-4o-mini,text-embedding-3-small,claude-3-5-haiku-latest",
                   help="comma-separated ids listed by GET /v1/models")
    p.add_argument("--verbose", action="store_true", help="access log on stderr")
    ARGS = p.parse_args()
    ARGS.split_points = None if ARGS.split is None else [int(x) for x in ARGS.split.split(",") if x.strip()]
    ARGS.models = [m for m in ARGS.models.split(",") if m]

    srv = Server(("127.0.0.1", ARGS.port), Handler)
    port = srv.server_address[1]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
