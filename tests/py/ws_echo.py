"""A real WebSocket server (the `websockets` library): echoes text upper-cased and binary as it is.

    python3 ws_echo.py --port PORT --log FILE

Each connection's request headers go to FILE as one JSON line. Prints `READY <port>` once it
listens.
"""
import argparse
import json
import sys

from websockets.sync.server import serve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()

    def handler(ws):
        with open(args.log, "a") as f:
            f.write(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}) + "\n")
        for msg in ws:
            ws.send(msg.upper() if isinstance(msg, str) else msg)

    with serve(handler, "127.0.0.1", args.port, compression="deflate") as server:
        print(f"READY {server.socket.getsockname()[1]}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
