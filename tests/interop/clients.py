"""Interop scenario with clients nobody here wrote: Python `websockets` over wss and Python
`aioquic` speaking WebTransport draft-02 (as Chromium does) chat in one room.

Usage: python3 clients.py PORT CERT_PEM   -> prints one JSON object with what each saw.
"""
import asyncio
import json
import ssl
import sys

import websockets
from aioquic.asyncio.client import connect

from wt_client import STEP, WebTransportClient, quic_config

PORT = int(sys.argv[1])
CERT = sys.argv[2]


async def main():
    out = {}
    tls = ssl.create_default_context(cafile=CERT)
    async with websockets.connect(f"wss://127.0.0.1:{PORT}/chat", ssl=tls) as ws:
        async def ws_recv():
            return json.loads(await asyncio.wait_for(ws.recv(), STEP))

        out["ws_welcome"] = await ws_recv()
        await ws.send(json.dumps({"type": "join", "room": "interop", "id": 1}))
        out["ws_join"] = await ws_recv()

        async with connect("127.0.0.1", PORT, configuration=quic_config(CERT),
                           create_protocol=WebTransportClient) as wt:
            out["wt_status"] = await wt.open("/chat", PORT)
            wt.open_message_stream()
            wt.send({"type": "hello"})
            out["wt_welcome"] = await wt.recv()
            wt.send({"type": "join", "room": "interop", "id": 2})
            out["wt_join"] = await wt.recv()
            out["ws_presence"] = await ws_recv()

            wt.send({"type": "publish", "room": "interop", "id": 3, "data": "from aioquic"})
            out["wt_publish_ack"] = await wt.recv()
            out["ws_got"] = await ws_recv()

            await ws.send(json.dumps({"type": "publish", "room": "interop", "id": 4, "data": "from websockets"}))
            out["ws_publish_ack"] = await ws_recv()
            out["wt_got"] = await wt.recv()

            await ws.send(json.dumps({"type": "publish", "room": "interop", "volatile": True, "data": {"x": 1}}))
            await ws_recv()  # ack
            out["wt_datagram"] = await asyncio.wait_for(wt.datagrams.get(), STEP)

            wt.send_datagram({"type": "publish", "room": "interop", "data": {"y": 2}})
            out["ws_got_volatile"] = await ws_recv()

        async with connect("127.0.0.1", PORT, configuration=quic_config(CERT),
                           create_protocol=WebTransportClient) as rejected:
            out["unknown_path_status"] = await rejected.open("/nowhere", PORT)

        try:
            async with websockets.connect(f"wss://127.0.0.1:{PORT}/nowhere", ssl=tls):
                out["ws_unknown_path_status"] = 101
        except websockets.InvalidStatus as e:
            out["ws_unknown_path_status"] = e.response.status_code
    print(json.dumps(out))


asyncio.run(main())
