"""A Redis pub/sub engine on redis-py speaking busway's frame and request/reply protocol
(docs/WIRE.md): a requester, or a responder that answers `count` requests.

  request --port P --channel C --data D [--header K=V ...]
  reply --port P --channel C --count N

`request` prints the reply as JSON; `reply` prints `ready` once subscribed, then each
request as JSON, and answers `pong:<data>` with the request's correlation id and free headers.
"""

import argparse
import json
import sys
import time
import uuid

import redis

from busway_frame import decode, encode


def request(r, a):
    inbox = f"_INBOX.{uuid.uuid4().hex}"
    corr = uuid.uuid4().hex
    ps = r.pubsub()
    ps.subscribe(inbox)
    ps.get_message(timeout=5)  # the subscribe confirmation
    extra = [tuple(h.split("=", 1)) for h in a.header]
    frame = encode(a.data.encode(), {"reply_to": inbox, "correlation_id": corr}, extra)
    r.publish(a.channel, frame)
    deadline = time.time() + 10
    while time.time() < deadline:
        m = ps.get_message(timeout=1)
        if m and m["type"] == "message":
            payload, headers, extra = decode(m["data"])
            if headers.get("correlation_id") != corr:
                continue
            print(json.dumps({"payload": payload.decode(), "headers": headers, "extra": extra}))
            return 0
    return 1


def reply(r, a):
    ps = r.pubsub()
    ps.subscribe(a.channel)
    ps.get_message(timeout=5)
    print("ready", flush=True)
    answered = 0
    deadline = time.time() + 30
    while answered < a.count and time.time() < deadline:
        m = ps.get_message(timeout=1)
        if not m or m["type"] != "message":
            continue
        payload, headers, extra = decode(m["data"])
        print(json.dumps({"payload": payload.decode(), "headers": headers, "extra": extra}), flush=True)
        answer = {"correlation_id": headers["correlation_id"], "source": "python"}
        r.publish(headers["reply_to"], encode(b"pong:" + payload, answer, extra))
        answered += 1
    return 0 if answered >= a.count else 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["request", "reply"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--data", default="")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--count", type=int, default=1)
    a = p.parse_args()
    r = redis.Redis(host="127.0.0.1", port=a.port)
    return request(r, a) if a.mode == "request" else reply(r, a)


if __name__ == "__main__":
    sys.exit(main())
