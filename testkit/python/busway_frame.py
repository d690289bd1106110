"""The busway frame of a Redis broadcast bus (docs/WIRE.md), written from the doc alone."""

MAGIC, VERSION = 0xB5, 1
FIELDS = ["id", "timestamp_us", "source", "content_type", "reply_to", "correlation_id"]


def _leb(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s):
    b = s.encode()
    return _leb(len(b)) + b


def encode(payload, headers=None, extra=None):
    """`headers`: busway's own headers by name; `extra`: free headers, in order."""
    headers, extra = headers or {}, extra or []
    flags, body = 0, b""
    for bit, name in enumerate(FIELDS):
        if name in headers:
            flags |= 1 << bit
            value = headers[name]
            body += _leb(value) if name == "timestamp_us" else _string(value)
    if extra:
        flags |= 0x40
        body += _leb(len(extra)) + b"".join(_string(k) + _string(v) for k, v in extra)
    return bytes([MAGIC, VERSION, flags]) + body + payload


def decode(data):
    """(payload, headers, extra) of a frame; ValueError for anything else."""
    if len(data) < 3 or data[0] != MAGIC or data[1] != VERSION or data[2] & 0x80:
        raise ValueError("not a busway frame of version 1")
    flags, at = data[2], 3

    def leb():
        nonlocal at
        n = shift = 0
        while True:
            b = data[at]
            at += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def string():
        nonlocal at
        n = leb()
        s = data[at:at + n].decode()
        at += n
        return s

    headers, extra = {}, []
    for bit, name in enumerate(FIELDS):
        if flags & (1 << bit):
            headers[name] = leb() if name == "timestamp_us" else string()
    if flags & 0x40:
        for _ in range(leb()):
            extra.append((string(), string()))
    return data[at:], headers, extra
