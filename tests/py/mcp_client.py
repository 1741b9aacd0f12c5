#!/usr/bin/env python3
"""MCP client (mcp SDK 2.x: streamable_http_client + ClientSession) printing one JSON result.

  --url URL                 MCP endpoint, e.g. http://127.0.0.1:18080/mcp-conn/mcp
  --header "Name: value"    extra HTTP header on every request (repeatable)
  --list                    list tools            -> {"tools": [names]}
  --call NAME --args JSON   call one tool         -> {"is_error", "content", "structured"}
  --list --call ...         both in one session   -> {"tools": [...], "call": {...}}

Exit 0 on success. A JSON-RPC error (mcp.MCPError, McpError in SDK 1.x) exits 3 with
{"error": message, "code": code, "status": <last HTTP status >= 400 or null>,
"body": <that response's body or null>}. The SDK turns an HTTP refusal (e.g. a
bare 401) into a JSON-RPC error (-32603 "Server returned an error response"), or,
if the body is a JSON-RPC error, into that error; "status" keeps the real HTTP
status. Other failures exit 1 with {"error", "type", "status"}.
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio
import httpx2
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client


def emit(obj, code: int = 0) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    sys.exit(code)


def content_item(item):
    text = getattr(item, "text", None)
    if isinstance(text, str):
        return text
    if hasattr(item, "model_dump"):
        return json.dumps(item.model_dump(mode="json", exclude_none=True))
    return str(item)


def leaves(exc: BaseException):
    """Flatten (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from leaves(e)
    else:
        yield exc


# Last HTTP error seen on the wire (status >= 400): the SDK turns such answers
# into JSON-RPC errors, so remember the real status/body for the error JSON.
HTTP_ERRORS: list[dict] = []


async def on_response(response: httpx2.Response) -> None:
    if response.status_code >= 400:
        body = None
        try:
            await response.aread()
            try:
                body = response.json()
            except ValueError:
                body = response.text
        except Exception:  # noqa: BLE001
            pass
        HTTP_ERRORS.append({"status": response.status_code, "body": body})


async def run(args) -> dict:
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()
    timeout = httpx2.Timeout(args.timeout, read=max(args.timeout, 300.0))
    async with httpx2.AsyncClient(
        headers=headers, timeout=timeout, event_hooks={"response": [on_response]}
    ) as http:
        async with streamable_http_client(args.url, http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=args.timeout) as session:
                await session.initialize()
                out: dict = {}
                if args.list:
                    tools = await session.list_tools()
                    out["tools"] = [t.name for t in tools.tools]
                if args.call:
                    r = await session.call_tool(args.call, args.args)
                    call = {
                        "is_error": bool(r.is_error),
                        "content": [content_item(c) for c in r.content],
                        "structured": r.structured_content,
                    }
                    if not args.list:
                        return call
                    out["call"] = call
                return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--header", action="append", default=[], help='"Name: value" (repeatable)')
    p.add_argument("--list", action="store_true")
    p.add_argument("--call", metavar="NAME")
    p.add_argument("--args", default="{}", help="tool arguments as a JSON object (default {})")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    args = p.parse_args()
    if not args.list and not args.call:
        p.error("give --list and/or --call NAME")
    try:
        args.args = json.loads(args.args)
    except ValueError as e:
        p.error(f"--args is not JSON: {e}")

    try:
        result = anyio.run(run, args)
    except BaseException as exc:  # noqa: BLE001 - turn everything into one JSON document
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        errs = list(leaves(exc))
        http = HTTP_ERRORS[-1] if HTTP_ERRORS else {"status": None, "body": None}
        for e in errs:
            if isinstance(e, MCPError):
                emit({"error": e.message, "code": e.code, "status": http["status"], "body": http["body"]}, 3)
        for e in errs:
            if isinstance(e, httpx2.HTTPStatusError):
                emit({"error": str(e), "code": None, "status": e.response.status_code, "body": http["body"],
                      "type": type(e).__name__}, 3)
        e = errs[0] if errs else exc
        emit({"error": str(e) or repr(e), "type": type(e).__name__, "status": http["status"]}, 1)
    emit(result, 0)


if __name__ == "__main__":
    main()
