"""Unidirectional-stream flood over WebTransport with aioquic (which, unlike some clients,
gets its unidirectional streams surfaced to the session): each stream costs the session a
token of its rate limit, so a flood ends in 4008 instead of one queued error per stream.

Usage: python3 uni_flood.py PORT CERT_PEM STREAMS   -> one JSON object.
"""
import asyncio
import json
import sys

from aioquic.asyncio.client import connect

from wt_client import WebTransportClient, quic_config

PORT = int(sys.argv[1])
CERT = sys.argv[2]
STREAMS = int(sys.argv[3])


async def main():
    out = {"errors": 0, "close": None}
    async with connect("127.0.0.1", PORT, configuration=quic_config(CERT),
                       create_protocol=WebTransportClient) as wt:
        out["status"] = await wt.open("/chat", PORT)
        wt.open_message_stream()
        wt.send({"type": "hello"})
        out["welcome"] = (await wt.recv())["type"]
        for _ in range(STREAMS):
            stream = wt.h3.create_webtransport_stream(wt.session_id, is_unidirectional=True)
            wt._quic.send_stream_data(stream, b"unused", end_stream=True)
        wt.transmit()
        try:
            while True:
                frame = await asyncio.wait_for(wt.frames.get(), 3)
                if frame.get("type") == "close":
                    out["close"] = frame
                    break
                if frame.get("type") == "error":
                    out["errors"] += 1
        except asyncio.TimeoutError:
            pass
    print(json.dumps(out))


asyncio.run(main())
