"""A real WebSocket client (the `websockets` library) for the edge tests.

    python3 ws_client.py --url ws://HOST:PORT/PATH --header 'Authorization: Bearer T'

Sends a text message, a text message in three fragments, a binary message and a ping, reads
the answers, closes with 1000 "done", and prints one JSON line: the answers and the extensions
the server accepted. Exit 3 when the handshake is refused (the line holds the HTTP status).
"""
import argparse
import json
import sys

from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--header", action="append", default=[])
    args = ap.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    try:
        ws = connect(args.url, additional_headers=headers, open_timeout=20)
    except InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code}))
        return 3
    answers = []
    with ws:
        ws.send("hello tunnel")
        answers.append(ws.recv(timeout=20))
        ws.send(["key AKIAIOSF", "ODNN7EXAMPLE in ", "three fragments"])
        answers.append(ws.recv(timeout=20))
        ws.send(bytes(range(256)) * 4)
        answers.append(len(ws.recv(timeout=20)))
        ws.ping(b"are you there").wait(timeout=20)
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
        ws.close(1000, "done")
    print(json.dumps({"answers": answers, "extensions": extensions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
