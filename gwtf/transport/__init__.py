"""Tensor messages between nodes: one wire format, validation before use, two backends, link emulation.

A call sends one `Message` to a named handler on a peer and returns the handler's reply `Message`. On the wire a
message is a frame (frame.py). Every frame a node receives is checked before a handler sees it (base.py); a bad one
is answered with an error and dropped, and the node keeps serving.

Files (each imports only those above it):
    config.py     TransportConfig: the run's transport settings (call_timeout); WireConfig (`[wire]`): codecs per
                  kind of tensor message, encryption of the direct path
    addresses.py  Addresses: --host-maddrs, --announce-maddrs, --use-relay, --public as the DHT's options and the
                  direct path's listen and announced hosts (hivemind's names and meaning)
    message.py    Message, MessageLimits (what a node accepts), TensorSpec and tensor_validator (a handler's checks)
    channels.py   byte channels a frame is read from: in-memory bytes, an asyncio stream (P2P), a TCP socket
    buffers.py    BufferPool: received frame bodies land in reused buffers (pinned on CUDA nodes), returned when
                  the last tensor decoded from one is freed
    crypto.py     the direct path's encryption: per-connection keys (HKDF from the run key, a secret handed out
                  over libp2p, both peer ids, both sides' nonces), AES-256-GCM (ChaCha20-Poly1305 on a CPU without
                  AES instructions) records with counter nonces
    frame.py      the wire format: prefix, JSON header, aligned body; encoding, decoding and the checks on receipt
    codecs.py     tensor codecs per kind of message (none, fp16, bf16, uint8, blockwise8, channel8, blockwise64),
                  stochastic rounding and error feedback, the header's "codecs" list checked against the limits before
                  decoding
    links.py      LinkEmulator: latency + bytes / bandwidth between regions (gwtf/resources/regions.json),
                  a directed link's bandwidth shared by the transfers on it
    base.py       Transport, the interface the nodes use (add_handler with a validator, call, shutdown, peer_id),
                  and the receive path every backend shares
    inprocess.py  InProcessNetwork, InProcessTransport: peers in one event loop (tests, simulator), frames really
                  encoded and decoded
    direct.py     DirectTcp: the encrypted direct TCP path (listener and announced addresses, secrets handed out
                  over P2P, pooled connections, fallback to P2P for a peer it cannot reach, dial-back for doctor)
    hivemind.py   HivemindTransport: hivemind P2P streams, every call over direct.py where the peer is reachable
                  (libp2p streams through the p2pd daemon reach ~200-250 MB/s on loopback, far below a socket);
                  the only file that imports hivemind (addresses.py checks multiaddresses with its parser)
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
