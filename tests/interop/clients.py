"""Interop scenario with clients nobody here wrote: Python `websockets` over wss and Python
`aioquic` speaking WebTransport draft-02 (as Chromium does) chat in one room.

Usage: python3 clients.py PORT CERT_PEM   -> prints one JSON object with what each saw.
"""
import asyncio
import json
import ssl
import struct
import sys

import websockets
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DatagramReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration

PORT = int(sys.argv[1])
CERT = sys.argv[2]
STEP = 10


def frame(obj, kind=0):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">BI", kind, len(payload)) + payload


class WebTransportClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status = asyncio.get_running_loop().create_future()
        self.frames = asyncio.Queue()
        self.datagrams = asyncio.Queue()
        self.buf = b""
        self.session_id = None
        self.stream_id = None

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived) and not self.status.done():
                self.status.set_result(int(dict(e.headers)[b":status"]))
            elif isinstance(e, WebTransportStreamDataReceived):
                self.buf += e.data
                while len(self.buf) >= 5:
                    kind, length = struct.unpack(">BI", self.buf[:5])
                    if len(self.buf) < 5 + length:
                        break
                    body, self.buf = self.buf[5:5 + length], self.buf[5 + length:]
                    self.frames.put_nowait(json.loads(body) if kind == 0 else body)
            elif isinstance(e, DatagramReceived):
                self.datagrams.put_nowait(json.loads(e.data))

    async def open(self, path):
        """Sends the extended CONNECT; returns the response status."""
        self.session_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(self.session_id, [
            (b":method", b"CONNECT"),
            (b":protocol", b"webtransport"),
            (b":scheme", b"https"),
            (b":authority", f"127.0.0.1:{PORT}".encode()),
            (b":path", path.encode()),
            (b"sec-webtransport-http3-draft02", b"1"),
        ])
        self.transmit()
        return await asyncio.wait_for(self.status, STEP)

    def open_message_stream(self):
        self.stream_id = self.h3.create_webtransport_stream(self.session_id)
        # aioquic does not mark a stream it opened itself as a WebTransport stream, so the
        # server's replies on it would be parsed as HTTP/3 frames: mark it by hand.
        streams = self.h3._get_or_create_stream(self.stream_id)
        if hasattr(streams, "__enter__"):  # aioquic >= 1.3: a context manager
            with streams as stream:
                stream.frame_type = FrameType.WEBTRANSPORT_STREAM
                stream.session_id = self.session_id
        else:
            streams.frame_type = FrameType.WEBTRANSPORT_STREAM
            streams.session_id = self.session_id

    def send(self, obj, kind=0):
        self._quic.send_stream_data(self.stream_id, frame(obj, kind))
        self.transmit()

    def send_datagram(self, obj):
        self.h3.send_datagram(self.session_id, json.dumps(obj).encode())
        self.transmit()

    async def recv(self):
        return await asyncio.wait_for(self.frames.get(), STEP)


def quic_config():
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_verify_locations(CERT)
    config.server_name = "localhost"
    return config


async def main():
    out = {}
    tls = ssl.create_default_context(cafile=CERT)
    async with websockets.connect(f"wss://127.0.0.1:{PORT}/chat", ssl=tls) as ws:
        async def ws_recv():
            return json.loads(await asyncio.wait_for(ws.recv(), STEP))

        out["ws_welcome"] = await ws_recv()
        await ws.send(json.dumps({"type": "join", "room": "interop", "id": 1}))
        out["ws_join"] = await ws_recv()

        async with connect("127.0.0.1", PORT, configuration=quic_config(),
                           create_protocol=WebTransportClient) as wt:
            out["wt_status"] = await wt.open("/chat")
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

        async with connect("127.0.0.1", PORT, configuration=quic_config(),
                           create_protocol=WebTransportClient) as rejected:
            out["unknown_path_status"] = await rejected.open("/nowhere")

        try:
            async with websockets.connect(f"wss://127.0.0.1:{PORT}/nowhere", ssl=tls):
                out["ws_unknown_path_status"] = 101
        except websockets.InvalidStatus as e:
            out["ws_unknown_path_status"] = e.response.status_code
    print(json.dumps(out))


asyncio.run(main())
