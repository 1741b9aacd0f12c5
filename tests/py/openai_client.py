#!/usr/bin/env python3
"""Drive the official `openai` SDK against --base-url and print one JSON result.

Exit 0 with the result JSON on stdout; exit 3 with
{"error", "type", "status", "body"} on an API error (openai.APIError and
subclasses: HTTP status errors, connection errors, timeouts, streams that end
abruptly); exit 1 with the same shape for any other failure.
See tests/py/README.md for the output formats.
"""

from __future__ import annotations

import argparse
import json
import sys

import openai

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

RESPONSES_WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": WEATHER_TOOL["function"]["parameters"],
}


def emit(obj, code: int = 0) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    sys.exit(code)


def dump(x):
    if x is None:
        return None
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json", exclude_none=True)
    return x


def error_json(e: BaseException, partial=None) -> dict:
    status = getattr(e, "status_code", None)
    body = None
    resp = getattr(e, "response", None)
    if status is not None and resp is not None:
        try:
            body = resp.json()
        except Exception:
            try:
                body = resp.text
            except Exception:
                body = getattr(e, "body", None)
    elif getattr(e, "body", None) is not None:
        body = e.body
    out = {"error": str(e), "type": type(e).__name__, "status": status, "body": body}
    if e.__cause__ is not None:
        out["cause"] = f"{type(e.__cause__).__name__}: {e.__cause__}"
    if partial is not None:
        out["partial"] = partial
    return out


def run(args, client: openai.OpenAI, partial: dict):
    model = args.model
    if args.mode == "chat":
        kw = {}
        if args.tools:
            kw["tools"] = [WEATHER_TOOL]
        r = client.chat.completions.create(model=model, messages=messages(args), **kw)
        choice = r.choices[0] if r.choices else None
        out = {
            "content": choice.message.content if choice else None,
            "usage": dump(r.usage),
            "model": r.model,
            "finish_reason": choice.finish_reason if choice else None,
        }
        if choice is not None and choice.message.tool_calls:
            out["tool_calls"] = [dump(t) for t in choice.message.tool_calls]
        return out

    if args.mode == "chat-stream":
        kw = {}
        if args.tools:
            kw["tools"] = [WEATHER_TOOL]
        if args.include_usage:
            kw["stream_options"] = {"include_usage": True}
        stream = client.chat.completions.create(model=model, messages=messages(args), stream=True, **kw)
        partial.update({"content": "", "deltas": [], "finish_reason": None, "usage": None, "chunks": 0})
        for chunk in stream:
            partial["chunks"] += 1
            if getattr(chunk, "usage", None):
                partial["usage"] = dump(chunk.usage)
            for c in chunk.choices or []:
                d = c.delta
                if d is not None and d.content:
                    partial["deltas"].append(d.content)
                    partial["content"] += d.content
                if c.finish_reason:
                    partial["finish_reason"] = c.finish_reason
        return dict(partial)

    if args.mode == "embeddings":
        inp = args.input if args.input else args.message
        r = client.embeddings.create(model=model, input=inp)
        dims = len(r.data[0].embedding) if r.data else 0
        return {"count": len(r.data), "dims": dims, "model": r.model, "usage": dump(r.usage)}

    if args.mode == "responses":
        kw = {}
        if args.tools:
            kw["tools"] = [RESPONSES_WEATHER_TOOL]
        if args.system:
            kw["instructions"] = args.system
        r = client.responses.create(model=model, input=args.message, **kw)
        return {"content": r.output_text, "usage": dump(r.usage), "model": r.model, "status": r.status}

    if args.mode == "responses-stream":
        kw = {}
        if args.tools:
            kw["tools"] = [RESPONSES_WEATHER_TOOL]
        if args.system:
            kw["instructions"] = args.system
        stream = client.responses.create(model=model, input=args.message, stream=True, **kw)
        partial.update({"content": "", "deltas": [], "events": [], "completed": False})
        final_text = None
        for ev in stream:
            partial["events"].append(ev.type)
            if ev.type == "response.output_text.delta":
                partial["deltas"].append(ev.delta)
                partial["content"] += ev.delta
            elif ev.type == "response.completed":
                partial["completed"] = True
                try:
                    final_text = ev.response.output_text
                except Exception:
                    final_text = None
        out = dict(partial)
        out["final_text"] = final_text
        return out

    if args.mode == "models":
        return {"ids": [m.id for m in client.models.list()]}

    raise SystemExit(f"unknown mode {args.mode}")


def messages(args):
    msgs = []
    if args.system:
        msgs.append({"role": "system", "content": args.system})
    msgs.append({"role": "user", "content": args.message})
    return msgs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:18080/v1")
    p.add_argument("--api-key", required=True)
    p.add_argument("--mode", required=True,
                   choices=["chat", "chat-stream", "embeddings", "responses", "responses-stream", "models"])
    p.add_argument("--message", default="hello", help="user message (also the embeddings input)")
    p.add_argument("--system", default=None, help="optional system message / responses instructions")
    p.add_argument("--input", action="append", default=None,
                   help="embeddings: one input string (repeatable; overrides --message, sends a list)")
    p.add_argument("--model", default=None,
                   help="model name (default gpt-4o-mini; text-embedding-3-small for embeddings)")
    p.add_argument("--tools", action="store_true", help="add the get_weather function tool definition")
    p.add_argument("--include-usage", action="store_true",
                   help="chat-stream: send stream_options.include_usage=true")
    p.add_argument("--header", action="append", default=[],
                   help='extra request header "Name: value" (repeatable)')
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    if args.model is None:
        args.model = "text-embedding-3-small" if args.mode == "embeddings" else "gpt-4o-mini"

    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip()] = value.strip()

    partial: dict = {}
    try:
        client = openai.OpenAI(
            base_url=args.base_url,
            api_key=args.api_key,
            max_retries=0,
            timeout=args.timeout,
            default_headers=headers or None,
        )
        result = run(args, client, partial)
    except openai.APIError as e:
        emit(error_json(e, partial or None), 3)
    except Exception as e:  # not an API error: still one JSON document
        emit(error_json(e, partial or None), 1)
    emit(result, 0)


if __name__ == "__main__":
    main()
