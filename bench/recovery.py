"""Recovery cost: the time from a recovering `join` to the last of 1,000 missed messages,
measured by one Python `websockets` client (which bounds the figure: the client parses
each message). Usage: python3 bench/recovery.py PORT CERT_PEM; the gateway must keep
history for rooms `recovery-*` (see bench/recovery.toml) and allow a fast publisher."""
import asyncio
import json
import ssl
import statistics
import sys
import time
import uuid

import websockets

PORT, CERT = int(sys.argv[1]), sys.argv[2]
MISSED, RUNS = 1000, 5


async def one(url, tls):
    room = f"recovery-{uuid.uuid4().hex[:8]}"
    async with websockets.connect(url, ssl=tls) as client, websockets.connect(url, ssl=tls) as pub:
        await client.recv(), await pub.recv()  # welcomes
        await client.send(json.dumps({"type": "join", "room": room, "id": 1}))
        ack = json.loads(await client.recv())
        await client.send(json.dumps({"type": "leave", "room": room, "id": 2}))
        await client.recv()
        for i in range(MISSED):
            await pub.send(json.dumps({"type": "publish", "room": room, "data": {"i": i, "pad": "x" * 60}}))
        for _ in range(MISSED):
            await pub.recv()
        started = time.perf_counter()
        await client.send(json.dumps({"type": "join", "room": room, "id": 3,
                                      "since": ack["seq"], "epoch": ack["epoch"]}))
        reply = json.loads(await client.recv())
        assert reply["recovered"] is True, reply
        last = None
        for _ in range(MISSED):
            last = json.loads(await client.recv())
        elapsed = (time.perf_counter() - started) * 1000
        assert last["seq"] == ack["seq"] + MISSED, last
        return elapsed


async def main():
    tls = ssl.create_default_context(cafile=CERT)
    url = f"wss://127.0.0.1:{PORT}/chat"
    times = [await one(url, tls) for _ in range(RUNS)]
    print(json.dumps({"missed": MISSED, "runs_ms": [round(t, 2) for t in times],
                      "median_ms": round(statistics.median(times), 2)}))


asyncio.run(main())
