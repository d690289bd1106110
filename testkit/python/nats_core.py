"""A core NATS engine on nats-py: a requester, or a responder that answers `count` requests.

  request --url U --subject S --data D [--header K=V ...]
  reply --url U --subject S --count N

`request` prints the reply as JSON (data, headers); `reply` prints `ready` once subscribed,
then each request as JSON, and answers `pong:<data>` with the request's headers.
"""

import argparse
import asyncio
import json
import sys

import nats


async def request(nc, a):
    headers = dict(h.split("=", 1) for h in a.header) or None
    m = await nc.request(a.subject, a.data.encode(), timeout=10, headers=headers)
    print(json.dumps({"data": m.data.decode(), "headers": dict(m.headers or {})}))
    return 0


async def reply(nc, a):
    done = asyncio.Event()
    answered = 0

    async def answer(m):
        nonlocal answered
        print(json.dumps({"subject": m.subject, "data": m.data.decode(),
                          "headers": dict(m.headers or {})}), flush=True)
        await nc.publish(m.reply, b"pong:" + m.data, headers=dict(m.headers or {}) or None)
        answered += 1
        if answered >= a.count:
            done.set()

    await nc.subscribe(a.subject, cb=answer)
    # nats-py writes a flush's PING straight to the socket while the SUB may still wait for
    # its flusher task: the first PONG can come before the server has the SUB. By the
    # second flush the SUB was written, so its PONG means the server has it.
    await nc.flush()
    await nc.flush()
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), 30)
    except asyncio.TimeoutError:
        return 1
    await nc.flush()
    return 0


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["request", "reply"])
    p.add_argument("--url", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--data", default="")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--count", type=int, default=1)
    a = p.parse_args()
    nc = await nats.connect(a.url)
    try:
        return await (request(nc, a) if a.mode == "request" else reply(nc, a))
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
