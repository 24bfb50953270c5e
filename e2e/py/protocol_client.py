"""Speaks OptiRoute's NATS protocol with nats-py, following only
docs/protocol.md: no OptiRoute code is imported or read.

Environment: OPTIROUTE_NATS_URL (default nats://127.0.0.1:4222) and
OPTIROUTE_PREFIX (the deployment's `nats.prefix`, default `optiroute`).
Each check prints `ok: <name>`; the first failure raises and exits non-zero.
"""

import asyncio
import json
import os
import time
import uuid

import msgpack
import nats
from nats.errors import TimeoutError as NatsTimeout

URL = os.environ.get("OPTIROUTE_NATS_URL", "nats://127.0.0.1:4222")
PREFIX = os.environ.get("OPTIROUTE_PREFIX", "optiroute")
GENERATE = f"{PREFIX}.generate"
PROVIDER_LOCAL = f"{PREFIX}.provider.local"
RESULTS_BUCKET = "optiroute-batch-results"
# Every NATS request carries a timeout (seconds).
TIMEOUT = 10.0

JSON_HEADERS = {"Content-Type": "application/json"}


def deadline_in(seconds: float) -> str:
    """`Optiroute-Deadline`: Unix epoch milliseconds."""
    return str(int((time.time() + seconds) * 1000))


def check_answer(a: dict, prompt_words: str = "") -> None:
    """The fields every generate answer has (protocol.md, "The answer")."""
    for field in ("text", "usage", "cost", "latency", "model", "routed_to", "provider", "cached"):
        assert field in a, f"answer lacks `{field}`: {a}"
    u = a["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], u
    assert a["provider"] in ("local", "cloud"), a
    assert a["routed_to"] in ("local", "cloud"), a
    assert isinstance(a["cost"], float) and a["cost"] >= 0, a


def error_of(msg):
    """(status code from the header, message) of an error reply, or None."""
    code = (msg.headers or {}).get("Nats-Service-Error-Code")
    return (int(code), msg) if code is not None else None


def status_of(msg) -> int:
    """The status of an error reply; fails on a success reply."""
    err = error_of(msg)
    assert err is not None, f"expected an error reply, got headers {msg.headers} body {msg.data[:200]!r}"
    return err[0]


async def generate_json(nc) -> None:
    rid = f"py-{uuid.uuid4().hex[:12]}"
    body = {"prompt": "What is the capital of France?", "provider": "local", "max_tokens": 5}
    headers = dict(JSON_HEADERS, **{"Optiroute-Request-Id": rid, "Optiroute-Deadline": deadline_in(8)})
    msg = await nc.request(GENERATE, json.dumps(body).encode(), timeout=TIMEOUT, headers=headers)
    assert error_of(msg) is None, (msg.headers, msg.data)
    assert (msg.headers or {}).get("Content-Type") == "application/json", msg.headers
    a = json.loads(msg.data)
    check_answer(a)
    assert a["request_id"] == rid, a
    assert a["provider"] == "local" and a["routed_to"] == "local", a
    assert a["usage"]["completion_tokens"] <= 5, a
    assert a["finish_reason"] in ("stop", "length"), a
    print("ok: json request:", json.dumps(a))

    # The same request again is served from the cache: cached, cost 0, and
    # saved_usd is what the first answer cost.
    again = await nc.request(GENERATE, json.dumps(body).encode(), timeout=TIMEOUT, headers=JSON_HEADERS)
    b = json.loads(again.data)
    assert b["cached"] is True and b["cost"] == 0, b
    assert b["saved_usd"] == a["cost"], (a, b)
    assert b["text"] == a["text"], (a, b)
    print("ok: json cache hit:", json.dumps(b))


async def generate_msgpack(nc) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a prime number."},
        ],
        "provider": "local",
        "max_tokens": 4,
        "temperature": 0.5,
        "cache": "off",
    }
    # No Content-Type header: the body is MessagePack, and so is the reply.
    msg = await nc.request(GENERATE, msgpack.packb(body), timeout=TIMEOUT,
                           headers={"Optiroute-Deadline": deadline_in(8)})
    assert error_of(msg) is None, (msg.headers, msg.data)
    a = msgpack.unpackb(msg.data)
    check_answer(a)
    assert a["cached"] is False and a["provider"] == "local", a
    assert a["usage"]["completion_tokens"] == 4 and a["finish_reason"] == "length", a
    print("ok: msgpack request:", json.dumps(a))


async def errors(nc) -> None:
    # A validation error, in JSON: 400 and a body naming the field.
    msg = await nc.request(GENERATE, json.dumps({"prompt": "hi", "max_tokens": 0}).encode(),
                           timeout=TIMEOUT, headers=JSON_HEADERS)
    status = status_of(msg)
    assert status == 400, msg.headers
    assert "max_tokens" in msg.headers["Nats-Service-Error"], msg.headers
    e = json.loads(msg.data)
    assert e["code"] == "bad_request" and "max_tokens" in e["message"], e
    print("ok: json error:", json.dumps(e), "headers:", json.dumps(msg.headers))

    # The same in MessagePack: the error body is MessagePack too.
    msg = await nc.request(GENERATE, msgpack.packb({"prompt": "   "}), timeout=TIMEOUT)
    status = status_of(msg)
    e = msgpack.unpackb(msg.data)
    assert status == 400 and e["code"] == "bad_request" and "prompt" in e["message"], (status, e)
    print("ok: msgpack error:", json.dumps(e))

    # The encoding is chosen by the `Content-Type` header alone, and header
    # names are case-sensitive: a JSON body under `content-type` is read as
    # MessagePack and refused, in MessagePack.
    msg = await nc.request(GENERATE, json.dumps({"prompt": "hi"}).encode(), timeout=TIMEOUT,
                           headers={"content-type": "application/json"})
    status = status_of(msg)
    e = msgpack.unpackb(msg.data)
    assert status == 400 and e["code"] == "bad_request" and "MessagePack" in e["message"], (status, e)
    print("ok: encoding by header:", json.dumps(e))

    # A deadline already past: 504, nothing generated.
    msg = await nc.request(GENERATE, json.dumps({"prompt": "too late"}).encode(), timeout=TIMEOUT,
                           headers=dict(JSON_HEADERS, **{"Optiroute-Deadline": deadline_in(-1)}))
    status = status_of(msg)
    assert status == 504 and json.loads(msg.data)["code"] == "timeout", (msg.headers, msg.data)
    print("ok: past deadline is 504")

    # A stream inbox outside the allowed inbox prefixes is refused.
    msg = await nc.request(GENERATE, json.dumps({"prompt": "hi"}).encode(), timeout=TIMEOUT,
                           headers=dict(JSON_HEADERS, **{"Optiroute-Stream-Inbox": "elsewhere.tokens"}))
    status = status_of(msg)
    assert status == 400 and json.loads(msg.data)["code"] == "bad_request", (msg.headers, msg.data)
    print("ok: foreign stream inbox is 400")


async def stream(nc) -> None:
    inbox = nc.new_inbox()
    chunks = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=chunks.put)
    body = {"prompt": "Tell me about streams", "provider": "local", "max_tokens": 6, "cache": "off"}
    headers = dict(JSON_HEADERS, **{"Optiroute-Stream-Inbox": inbox})
    reply = asyncio.ensure_future(
        nc.request(GENERATE, json.dumps(body).encode(), timeout=TIMEOUT, headers=headers))
    pieces = []

    def take(m) -> None:
        # Chunks are MessagePack {index, delta}, whatever the request's format.
        c = msgpack.unpackb(m.data)
        assert c["index"] == len(pieces), (c, len(pieces))
        pieces.append(c["delta"])

    # Tokens as they come, until the final reply.
    while not reply.done():
        chunk = asyncio.ensure_future(chunks.get())
        await asyncio.wait({reply, chunk}, return_when=asyncio.FIRST_COMPLETED)
        if chunk.done():
            take(chunk.result())
        else:
            chunk.cancel()
    while not chunks.empty():
        take(chunks.get_nowait())
    msg = await reply
    await sub.unsubscribe()
    assert error_of(msg) is None, (msg.headers, msg.data)
    a = json.loads(msg.data)
    streamed = "".join(pieces)
    assert len(pieces) >= 2, pieces
    # The reply holds the whole text: what did not come as chunks is its rest.
    assert a["text"].startswith(streamed), (streamed, a["text"])
    rest = a["text"][len(streamed):]
    print(f"ok: stream: {len(pieces)} chunks {json.dumps(pieces)}, remainder {json.dumps(rest)}")


async def cancel(nc) -> None:
    """Publishing on `<inbox>.cancel` after the first chunk stops generation:
    the reply is the error `cancelled` (499)."""
    inbox = nc.new_inbox()
    chunks = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=chunks.put)
    body = {"prompt": "A long story, please", "provider": "local", "max_tokens": 16, "cache": "off"}
    headers = dict(JSON_HEADERS, **{"Optiroute-Stream-Inbox": inbox})
    reply = asyncio.ensure_future(
        nc.request(GENERATE, json.dumps(body).encode(), timeout=TIMEOUT, headers=headers))
    first = msgpack.unpackb((await asyncio.wait_for(chunks.get(), TIMEOUT)).data)
    assert first["index"] == 0, first
    await nc.publish(f"{inbox}.cancel", b"")
    msg = await reply
    await sub.unsubscribe()
    status = status_of(msg)
    e = json.loads(msg.data)
    assert status == 499 and e["code"] == "cancelled", (msg.headers, e)
    print("ok: cancel:", json.dumps(e))


async def provider_direct(nc) -> None:
    """What a router sends a provider pool, and what a provider answers."""
    body = {"prompt": "Hello, provider", "max_tokens": 3}
    msg = await nc.request(PROVIDER_LOCAL, json.dumps(body).encode(), timeout=TIMEOUT,
                           headers=dict(JSON_HEADERS, **{"Optiroute-Deadline": deadline_in(5)}))
    assert error_of(msg) is None, (msg.headers, msg.data)
    r = json.loads(msg.data)
    for field in ("text", "usage", "model", "cost_usd", "latency"):
        assert field in r, (field, r)
    assert r["usage"]["completion_tokens"] == 3 and r["cost_usd"] >= 0, r
    print("ok: provider reply:", json.dumps(r))


async def services(nc) -> None:
    # Service names carry the prefix: <prefix>-router, <prefix>-local, <prefix>-cloud.
    service = PREFIX.replace(".", "_")
    ping = json.loads((await nc.request(f"$SRV.PING.{service}-router", b"", timeout=TIMEOUT)).data)
    assert ping["type"] == "io.nats.micro.v1.ping_response" and ping["name"] == f"{service}-router", ping
    stats = json.loads((await nc.request(f"$SRV.STATS.{service}-local", b"", timeout=TIMEOUT)).data)
    ep = stats["endpoints"][0]
    assert ep["subject"] == PROVIDER_LOCAL and ep["queue_group"] == f"{PREFIX}.provider.local", ep
    assert ep["num_requests"] >= 1, ep
    # The cloud service publishes its circuit breaker's state.
    cloud = json.loads((await nc.request(f"$SRV.STATS.{service}-cloud", b"", timeout=TIMEOUT)).data)
    assert cloud["endpoints"][0]["data"]["breaker"] in ("closed", "open", "half_open"), cloud
    print("ok: services:", json.dumps(ping), json.dumps(ep), "breaker:", cloud["endpoints"][0]["data"]["breaker"])


async def batch(nc) -> None:
    js = nc.jetstream(timeout=TIMEOUT)
    batch_id = f"py{uuid.uuid4().hex[:10]}"
    subject = f"{PREFIX}.batch.{batch_id}"
    job1 = {"line": 1, "custom_id": "first", "prompt": "Batch question one", "provider": "local", "max_tokens": 4}
    job2 = {"line": 2, "custom_id": "second", "messages": [{"role": "user", "content": "Batch chat two"}],
            "provider": "local", "max_tokens": 3}
    ack = await js.publish(subject, json.dumps(job1).encode(),
                           headers=dict(JSON_HEADERS, **{"Nats-Msg-Id": f"{batch_id}:1"}))
    assert ack.stream == "OPTIROUTE_BATCH", ack
    await js.publish(subject, msgpack.packb(job2), headers={"Nats-Msg-Id": f"{batch_id}:2"})
    # The same job again (same Nats-Msg-Id) is dropped as a duplicate.
    dup = await js.publish(subject, json.dumps(job1).encode(),
                           headers=dict(JSON_HEADERS, **{"Nats-Msg-Id": f"{batch_id}:1"}))
    assert dup.duplicate, dup

    kv = await js.key_value(RESULTS_BUCKET)
    for line, job in ((1, job1), (2, job2)):
        watcher = await kv.watch(f"{batch_id}.{line}")
        entry = None
        while entry is None or entry.value is None:
            entry = await watcher.updates(timeout=TIMEOUT)
        await watcher.stop()
        r = msgpack.unpackb(entry.value)
        assert r["line"] == line and r["custom_id"] == job["custom_id"], r
        assert r["status"] == "ok", r
        check_answer(r["response"])
        assert r["response"]["usage"]["completion_tokens"] == job["max_tokens"], r
        print(f"ok: batch result {batch_id}.{line}:", json.dumps(r))


async def main() -> None:
    nc = await nats.connect(URL, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await generate_json(nc)
        await generate_msgpack(nc)
        await errors(nc)
        await stream(nc)
        await cancel(nc)
        await provider_direct(nc)
        await services(nc)
        await batch(nc)
    finally:
        await nc.close()
    print("all ok")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(), timeout=60))
