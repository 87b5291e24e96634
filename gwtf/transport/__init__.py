"""Tensor messages between nodes: one wire format, validation before use, two backends, link emulation.

A call sends one `Message` to a named handler on a peer and returns the handler's reply `Message`. On the wire a
message is a frame (frame.py). Every frame a node receives is checked before a handler sees it (base.py); a bad one
is answered with an error and dropped, and the node keeps serving.

Files (each imports only those above it):
    config.py     TransportConfig: the run's transport settings (call_timeout)
    message.py    Message, MessageLimits (what a node accepts), TensorSpec and tensor_validator (a handler's checks)
    channels.py   byte channels a frame is read from: in-memory bytes, an asyncio stream (P2P), a TCP socket
    frame.py      the wire format: prefix, JSON header, aligned body; encoding, decoding and the checks on receipt
    links.py      LinkEmulator: latency + bytes / bandwidth between regions (gwtf/resources/regions.json),
                  a directed link's bandwidth shared by the transfers on it
    base.py       Transport, the interface the nodes use (add_handler with a validator, call, shutdown, peer_id),
                  and the receive path every backend shares
    inprocess.py  InProcessNetwork, InProcessTransport: peers in one event loop (tests, simulator), frames really
                  encoded and decoded
    direct.py     DirectTcp: the token-authenticated direct TCP path for large tensors (listener, tokens handed
                  out over P2P, pooled connections)
    hivemind.py   HivemindTransport: hivemind P2P streams for control and small messages, big payloads over
                  direct.py (libp2p streams through the p2pd daemon reach ~200-250 MB/s on loopback, far below a
                  socket); the only file that imports hivemind
"""

from gwtf.transport.base import Handler, Transport
from gwtf.transport.config import TransportConfig
from gwtf.transport.frame import encode_frame, error_frame, is_error_frame
from gwtf.transport.hivemind import DEFAULT_DIRECT_TCP_MIN_BYTES, HivemindTransport
from gwtf.transport.inprocess import InProcessNetwork, InProcessTransport
from gwtf.transport.links import LinkEmulator
from gwtf.transport.message import DEFAULT_DTYPES, Message, MessageLimits, TensorSpec, Validator, tensor_validator

__all__ = [
    "DEFAULT_DIRECT_TCP_MIN_BYTES",
    "DEFAULT_DTYPES",
    "Handler",
    "HivemindTransport",
    "InProcessNetwork",
    "InProcessTransport",
    "LinkEmulator",
    "Message",
    "MessageLimits",
    "TensorSpec",
    "Transport",
    "TransportConfig",
    "Validator",
    "encode_frame",
    "error_frame",
    "is_error_frame",
    "tensor_validator",
]
