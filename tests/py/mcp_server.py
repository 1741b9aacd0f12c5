#!/usr/bin/env python3
"""A real MCP server (mcp SDK 2.x MCPServer, formerly FastMCP) over streamable HTTP.

Serves the MCP endpoint at http://127.0.0.1:<port>/mcp and prints exactly one
line "READY <port>" on stdout once the port accepts connections.

Tools: echo, add, lookup_user, delete_everything, slow (see README.md).

  --require-bearer TOKEN  reject HTTP requests without "Authorization: Bearer TOKEN" (401)
  --log FILE              one JSON line per HTTP request (method, path, headers, body)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

mcp = MCPServer("custos-test", version="1.0.0", log_level="WARNING")


@mcp.tool()
def echo(text: str) -> str:
    """Echo the given text back."""
    return text


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def lookup_user(user_id: int) -> dict[str, Any]:
    """Look up a user record (contains PII and a secret)."""
    return {"id": user_id, "name": "Ada", "email": "ada@example.com", "api_key": "AKIAIOSFODNN7EXAMPLE"}


@mcp.tool()
def delete_everything(confirm: bool) -> str:
    """Delete everything. Dangerous."""
    return "deleted everything" if confirm else "nothing deleted (confirm=false)"


@mcp.tool()
async def slow(seconds: float) -> str:
    """Sleep for the given number of seconds, then answer."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


class Gate:
    """ASGI middleware: request logging and optional bearer check."""

    def __init__(self, app, token: str | None, log_path: str | None):
        self.app = app
        self.token = token
        self.log_path = log_path
        self.lock = threading.Lock()

    def log(self, entry: dict) -> None:
        if not self.log_path:
            return
        with self.lock:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or []:
            k = k.decode("latin-1").lower()
            v = v.decode("latin-1")
            headers[k] = v if k not in headers else headers[k] + ", " + v
        auth_ok = self.token is None or headers.get("authorization") == f"Bearer {self.token}"

        # Buffer the request body so it can be logged, then replay it to the app.
        chunks = []
        more = True
        first_extra = None
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                first_extra = msg
                break
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        path = scope.get("path", "")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        self.log({"ts": time.time(), "method": scope.get("method"), "path": path, "headers": headers,
                  "body": body, "auth_ok": auth_ok})

        if not auth_ok:
            data = json.dumps({"error": "unauthorized", "detail": "missing or wrong bearer token"}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"www-authenticate", b'Bearer realm="custos-test-mcp"'),
            ]})
            await send({"type": "http.response.body", "body": data})
            return

        replayed = False

        async def replay():
            nonlocal replayed, first_extra
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            if first_extra is not None:
                m, first_extra = first_extra, None
                return m
            return await receive()

        await self.app(scope, replay, send)


async def serve(args) -> None:
    app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=args.stateless,
        json_response=args.json_response,
        # The edge proxies with arbitrary Host headers: no DNS-rebinding checks.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host="127.0.0.1",
    )
    wrapped = Gate(app, args.require_bearer, args.log)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]

    config = uvicorn.Config(wrapped, log_level="warning", lifespan="on", access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)

    async def announce():
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        # Double-check the port really accepts connections before announcing.
        for _ in range(250):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()

    task = asyncio.create_task(announce())
    await server.serve(sockets=[sock])
    task.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--require-bearer", metavar="TOKEN", default=None,
                   help='401 unless the request carries "Authorization: Bearer TOKEN"')
    p.add_argument("--log", default=None, help="append one JSON line per HTTP request to this file")
    p.add_argument("--stateless", action="store_true", help="stateless streamable HTTP (no Mcp-Session-Id)")
    p.add_argument("--json-response", action="store_true",
                   help="answer POSTs with application/json instead of an SSE stream")
    args = p.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
