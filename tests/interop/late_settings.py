"""A WebTransport client whose HTTP/3 SETTINGS arrive after its CONNECT (aioquic with its
control streams held back): the gateway must wait for the settings, then accept.

Usage: python3 late_settings.py PORT CERT_PEM DELAY_SECONDS   -> one JSON object.
"""
import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.h3.connection import (FrameType, H3Connection, StreamType, encode_frame,
                                    encode_settings)

import wt_client
from wt_client import WebTransportClient, quic_config

PORT = int(sys.argv[1])
CERT = sys.argv[2]
DELAY = float(sys.argv[3])


class LateSettings(H3Connection):
    """Opens its QPACK streams at once and its control stream (SETTINGS) only when told to."""

    def _init_connection(self):
        self._local_encoder_stream_id = self._create_uni_stream(StreamType.QPACK_ENCODER)
        self._local_decoder_stream_id = self._create_uni_stream(StreamType.QPACK_DECODER)

    def send_settings_now(self):
        self._local_control_stream_id = self._create_uni_stream(StreamType.CONTROL)
        self._sent_settings = self._get_local_settings()
        self._quic.send_stream_data(
            self._local_control_stream_id,
            encode_frame(FrameType.SETTINGS, encode_settings(self._sent_settings)),
        )


async def main():
    out = {}
    wt_client.H3Connection = LateSettings
    async with connect("127.0.0.1", PORT, configuration=quic_config(CERT),
                       create_protocol=WebTransportClient) as wt:
        status = asyncio.ensure_future(wt.open("/chat", PORT))
        await asyncio.sleep(DELAY)
        out["answered_before_settings"] = status.done()
        wt.h3.send_settings_now()
        wt.transmit()
        out["status"] = await status
        wt.open_message_stream()
        wt.send({"type": "hello"})
        out["welcome"] = (await wt.recv())["type"]
    print(json.dumps(out))


asyncio.run(main())
