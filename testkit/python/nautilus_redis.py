"""A Redis Streams engine written the way the "nautilus" platform's Python client works.

One entry per message: message_type, source_engine, source_instance, payload (JSON),
priority, timestamp (float seconds), correlation_id; XADD MAXLEN ~ 100000; read with
XREADGROUP in group <engine>-group as <engine>-consumer-<instance>, then XACK.

  produce --port P --key K --type T --count N [--start S] [--interval SECONDS]
  consume --port P --key K --group G --consumer C --count N [--timeout SECONDS]

`consume` prints one JSON object per entry (its fields) and exits 1 if fewer than N came.
"""

import argparse
import json
import sys
import time

import redis


def produce(r, a):
    for seq in range(a.start, a.start + a.count):
        r.xadd(
            a.key,
            {
                "message_type": a.type,
                "source_engine": "legacy",
                "source_instance": "1",
                "payload": json.dumps({"seq": seq}),
                "priority": "normal",
                "timestamp": time.time(),
                "correlation_id": f"corr-{seq}",
            },
            maxlen=100000,
            approximate=True,
        )
        if a.interval:
            time.sleep(a.interval)


def consume(r, a):
    try:
        r.xgroup_create(a.key, a.group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    seen = 0
    deadline = time.time() + a.timeout
    while seen < a.count and time.time() < deadline:
        reply = r.xreadgroup(a.group, a.consumer, {a.key: ">"}, count=100, block=200)
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                print(json.dumps({k.decode(): v.decode() for k, v in fields.items()}), flush=True)
                r.xack(a.key, a.group, entry_id)
                seen += 1
    return 0 if seen >= a.count else 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["produce", "consume"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--type", default="order_fill")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--group")
    p.add_argument("--consumer")
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()
    r = redis.Redis(host="127.0.0.1", port=a.port)
    if a.mode == "produce":
        produce(r, a)
        return 0
    return consume(r, a)


if __name__ == "__main__":
    sys.exit(main())
