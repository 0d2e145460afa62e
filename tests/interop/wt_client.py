"""An aioquic WebTransport client (draft-02, as Chromium speaks it) for the interop tests:
extended CONNECT, the message stream with the gateway's framing, datagrams."""
import asyncio
import json
import ssl
import struct

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DatagramReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration

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
        self.authority = ""

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

    async def open(self, path, port):
        """Sends the extended CONNECT to 127.0.0.1:`port`; returns the response status."""
        self.authority = f"127.0.0.1:{port}"
        self.session_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(self.session_id, [
            (b":method", b"CONNECT"),
            (b":protocol", b"webtransport"),
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
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


def quic_config(cert):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_verify_locations(cert)
    config.server_name = "localhost"
    return config
