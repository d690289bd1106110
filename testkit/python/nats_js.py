"""A JetStream engine on nats-py: publishes with headers, or reads a durable pull consumer.

  publish --url U --subject S --count N [--header K=V ...]
  consume --url U --stream ST --durable D --filter F --count N [--timeout SECONDS]

`publish` waits for each PubAck. `consume` prints one JSON object per message (subject,
data, headers), acks it, and exits 1 if fewer than N came.
"""

import argparse
import asyncio
import json
import sys
import time

import nats


async def publish(js, a):
    headers = dict(h.split("=", 1) for h in a.header)
    for seq in range(a.count):
        await js.publish(a.subject, json.dumps({"seq": seq}).encode(), headers=headers or None)
    return 0


async def consume(js, a):
    sub = await js.pull_subscribe(a.filter, durable=a.durable, stream=a.stream)
    seen = 0
    deadline = time.time() + a.timeout
    while seen < a.count and time.time() < deadline:
        try:
            msgs = await sub.fetch(min(100, a.count - seen), timeout=1)
        except nats.errors.TimeoutError:
            continue
        for m in msgs:
            print(json.dumps({
                "subject": m.subject,
                "data": m.data.decode(),
                "headers": dict(m.headers or {}),
            }), flush=True)
            await m.ack()
            seen += 1
    return 0 if seen >= a.count else 1


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["publish", "consume"])
    p.add_argument("--url", required=True)
    p.add_argument("--subject")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--stream")
    p.add_argument("--durable")
    p.add_argument("--filter")
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    nc = await nats.connect(a.url)
    try:
        js = nc.jetstream()
        return await (publish(js, a) if a.mode == "publish" else consume(js, a))
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
