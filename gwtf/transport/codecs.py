"""Tensor codecs on the wire (`[wire]` in a run config): what a message's float tensors travel as, per kind.

    none        as they are (float32: 4 bytes a value)
    fp16, bf16  2 bytes a value; fp16 clamps to its range first, as hivemind's Float16Compression does
    uint8       hivemind.compression's Uniform8BitQuantization: 256 bins over mean +- 3 sigma (a range of 6), each
                value sent as its bin (1 byte) and the bins' means (1 KiB); values past 3 sigma fall in the edge bins
                (clipped to their mean: costly for activations with outliers)
    blockwise8  8-bit absmax quantization in blocks of 4096 values (1 byte a value, one float32 scale a block), as
                bitsandbytes' blockwise quantization (which hivemind's BlockwiseQuantization needs and this install
                lacks) does with a linear code instead of its dynamic one; outliers only cost their own block
    channel8    8-bit absmax per channel over runs of ROWS (64) rows: a tensor (..., rows, channels) is quantized
                column by column, one float32 scale per 64 values (1.0625 bytes a value). A trained transformer's
                hidden states have outlier channels (SmolLM2-135M at a stage boundary: one channel reaches 333
                where the median channel's largest value is 9): a flat block that holds one of them rounds every
                other value of the block to a few steps. Measured on SmolLM2's stage-1 output: relative error
                0.65 % against blockwise8's 5.5 % and uint8's 43 % (clipped outliers); but one scale per channel
                over 64 tokens lets a token with massive activations (an attention-sink token) set the step of
                every other token in those channels
    blockwise64 8-bit absmax in blocks of SMALL_BLOCK (64) values, as bitsandbytes' small blocks: a hidden state's
                row is one token's channels, so a block is 64 channels of one token (1.0625 bytes a value): an
                outlier channel costs its block of one token, a massive token only its own blocks. Measured on
                SmolLM2-135M (benchmarks.codec_fidelity: 3 stages, every boundary's forward activations quantized,
                the rest exact) the parameters' gradient is 1 - cos 2.3e-3 off the exact one (channel8 7.0e-2,
                blockwise8 0.54), the loss -0.003 % (channel8 +2.0 %); 30 steps of fine-tuning end -0.10 % from fp32
                (channel8 +2.2 to +2.7 %). Its gradients round to nearest: stochastic rounding more than doubled
                their error per step there (unbiased, but a fine-tuning's few steps do not average it out); its
                averaging still rounds stochastically, with error feedback

A message's kind picks its codec (`KIND_CATEGORY`). The sender replaces each float tensor of at least MIN_NUMEL
values by its encoded parts and lists, in the frame header's "codecs", each original tensor's codec, dtype and
shape; the receiver checks that list against its limits before decoding (an 8-bit part cannot decode to more than
its declared shape) and the decoded values for finiteness. Gradients and averaging round stochastically in
blockwise8 (unbiased: a rounding error that averages out over steps instead of piling up), and averaging requests
carry error feedback (`ErrorFeedback`: what quantization dropped from a tensor is added to the next one sent);
blockwise64's pipeline gradients round to nearest (above).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from gwtf.errors import BadMessage
from gwtf.transport.message import Message, MessageLimits, dtype_name

KIND_CATEGORY = {
    "forward": "activations",
    "head": "activations",
    "recompute": "activations",
    "backward": "gradients",
    "embed_grad": "gradients",
    "recover": "gradients",
    "avg": "averaging",
    "state": "state",
}
MIN_NUMEL = 1024  # smaller tensors travel as they are: a codec would save little and cost a header entry
BLOCK = 4096  # blockwise8's block, as bitsandbytes' default
SMALL_BLOCK = 64  # blockwise64's block: 64 channels of one token
ROWS = 64  # channel8's run of rows per scale
_FP16_MAX = 65504.0
_PARTS = {"fp16": 1, "bf16": 1, "uint8": 2, "blockwise8": 2, "channel8": 2, "blockwise64": 2}
STOCHASTIC = ("gradients", "averaging")  # categories whose 8-bit rounding is stochastic
NEAREST = {"blockwise64": ("gradients",)}  # ... except these codecs' (measured: see blockwise64 above)
ERROR_FEEDBACK = ("averaging",)  # categories whose requests carry error feedback


def rounds_stochastically(codec: str, category: str) -> bool:
    """Whether `codec` rounds a `category` tensor stochastically on the wire (STOCHASTIC, less NEAREST)."""
    return category in STOCHASTIC and category not in NEAREST.get(codec, ())


class ErrorFeedback:
    """Per (kind, tensor position, shape): what quantization dropped from the last tensor this node sent there,
    added to the next one (error feedback, Seide et al. 2014 / Karimireddy et al. 2019's EF-SGD)."""

    def __init__(self) -> None:
        self._residual: dict[tuple[str, int, tuple[int, ...]], torch.Tensor] = {}

    def corrected(self, key: tuple[str, int, tuple[int, ...]], tensor: torch.Tensor) -> torch.Tensor:
        residual = self._residual.get(key)
        return tensor if residual is None else tensor + residual

    def remember(self, key: tuple[str, int, tuple[int, ...]], meant: torch.Tensor, sent: torch.Tensor) -> None:
        self._residual[key] = (meant - sent.to(meant.dtype)).detach()


def encode(tensor: torch.Tensor, codec: str, stochastic: bool = False, gen: torch.Generator | None = None) -> list:
    """The wire parts of `tensor` under `codec` (see decode)."""
    x = tensor.detach()
    if codec == "fp16":
        return [x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)]
    if codec == "bf16":
        return [x.to(torch.bfloat16)]
    if codec == "uint8":
        from hivemind.compression import Uniform8BitQuantization

        indices, codebook = Uniform8BitQuantization().quantize(x.float())
        return [torch.from_numpy(indices).reshape(-1), torch.from_numpy(codebook)]
    if codec == "blockwise8":
        return _blockwise_encode(x, stochastic, gen, BLOCK)
    if codec == "blockwise64":
        return _blockwise_encode(x, stochastic, gen, SMALL_BLOCK)
    if codec == "channel8":
        return _channel_encode(x, stochastic, gen)
    raise ValueError(f"unknown codec {codec!r}")


def decode(parts: list[torch.Tensor], codec: str, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    numel = math.prod(shape)
    if codec in ("fp16", "bf16"):
        return parts[0].to(dtype).reshape(shape)
    if codec == "uint8":
        indices, codebook = parts
        return codebook[indices.long()].to(dtype).reshape(shape)  # as Quantization.extract in hivemind
    if codec in ("blockwise8", "blockwise64"):
        q, scales = parts
        block = BLOCK if codec == "blockwise8" else SMALL_BLOCK
        blocks = torch.nn.functional.pad(q.float(), (0, (-numel) % block)).view(-1, block)
        return (blocks * (scales.view(-1, 1) / 127.0)).view(-1)[:numel].to(dtype).reshape(shape)
    if codec == "channel8":
        q, scales = parts
        rows, n, channels = _layout(shape)
        runs = -(-n // ROWS)
        cols = torch.nn.functional.pad(q.float().view(rows, channels, n), (0, runs * ROWS - n))
        cols = cols.view(rows, channels, runs, ROWS) * (scales.view(rows, channels, runs, 1) / 127.0)
        return cols.view(rows, channels, runs * ROWS)[:, :, :n].transpose(1, 2).to(dtype).reshape(shape)
    raise BadMessage(f"unknown codec {codec!r}")


def _absmax8(blocks: torch.Tensor, stochastic: bool, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block (the last dim) to int8 steps of its absmax / 127, and the absmaxes: round to nearest, or
    stochastically, floor(v + U[0,1)), which is unbiased: E[q] = v."""
    absmax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = blocks * (127.0 / absmax)
    if stochastic:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=gen))
    else:
        scaled = scaled.round()
    return scaled.clamp_(-127, 127).to(torch.int8), absmax


def _layout(shape: list[int]) -> tuple[int, int, int]:
    """channel8's view of a shape: (leading rows, rows, channels); a 1-D tensor is one channel."""
    if len(shape) < 2:
        return 1, math.prod(shape), 1
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _channel_encode(x: torch.Tensor, stochastic: bool, gen: torch.Generator | None) -> list[torch.Tensor]:
    rows, n, channels = _layout(list(x.shape))
    cols = x.reshape(rows, n, channels).transpose(1, 2).float()  # (rows, channels, n): a channel's values in a row
    runs = -(-n // ROWS)
    blocks = torch.nn.functional.pad(cols, (0, runs * ROWS - n)).reshape(rows, channels, runs, ROWS)
    q, absmax = _absmax8(blocks, stochastic, gen)
    return [q.view(rows, channels, runs * ROWS)[:, :, :n].reshape(-1), absmax.reshape(-1)]


def _blockwise_encode(x: torch.Tensor, stochastic: bool, gen: torch.Generator | None,
                      block: int) -> list[torch.Tensor]:  # fmt: skip
    flat = x.reshape(-1).float()
    n = flat.numel()
    q, absmax = _absmax8(torch.nn.functional.pad(flat, (0, (-n) % block)).view(-1, block), stochastic, gen)
    return [q.view(-1)[:n], absmax.view(-1)]


def _expected_parts(codec: str, shape: list[int]) -> list[tuple[torch.dtype, int]]:
    """(dtype, numel) of each wire part of a tensor of `shape`."""
    numel = math.prod(shape)
    rows, n, channels = _layout(shape)
    return {
        "fp16": [(torch.float16, numel)],
        "bf16": [(torch.bfloat16, numel)],
        "uint8": [(torch.uint8, numel), (torch.float32, 256)],
        "blockwise8": [(torch.int8, numel), (torch.float32, -(-numel // BLOCK))],
        "blockwise64": [(torch.int8, numel), (torch.float32, -(-numel // SMALL_BLOCK))],
        "channel8": [(torch.int8, numel), (torch.float32, rows * channels * -(-n // ROWS))],
    }[codec]


class WireCodecs:
    """One transport's codecs: which one each kind of message takes (`use`), encoding what it sends (with error
    feedback where configured) and checking and decoding what it receives."""

    def __init__(self) -> None:
        self.by_kind: dict[str, str] = {}
        self.feedback = ErrorFeedback()
        self._gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # not the training RNG

    def use(self, wire: Any) -> None:
        """Take a WireConfig's codec per category."""
        self.by_kind = {kind: getattr(wire, cat) for kind, cat in KIND_CATEGORY.items() if getattr(wire, cat) != "none"}

    def compress(self, msg: Message, request: bool) -> tuple[Message, list | None]:
        """The message as it travels, and the header's "codecs" list (None: nothing encoded)."""
        codec = self.by_kind.get(msg.kind)
        if codec is None or not any(_encodable(t) for t in msg.tensors):
            return msg, None
        category = KIND_CATEGORY[msg.kind]
        feedback = request and category in ERROR_FEEDBACK
        wire: list[torch.Tensor] = []
        entries: list[list[Any] | None] = []
        for i, t in enumerate(msg.tensors):
            if not _encodable(t):
                wire.append(t)
                entries.append(None)
                continue
            key = (msg.kind, i, tuple(t.shape))
            meant = self.feedback.corrected(key, t.detach()) if feedback else t
            parts = encode(meant, codec, rounds_stochastically(codec, category), self._gen)
            if feedback:
                self.feedback.remember(key, meant, decode(parts, codec, t.dtype, list(t.shape)))
            wire += parts
            entries.append([codec, dtype_name(t.dtype), list(t.shape)])
        sent = Message(msg.kind, msg.run_id, msg.sender, msg.iteration, msg.microbatch_id, msg.stage, wire, msg.meta)
        return sent, entries

    @staticmethod
    def decompress(msg: Message, entries: Any, limits: MessageLimits) -> Message:
        """`msg` with its tensors decoded as its header's "codecs" says; BadMessage if that list does not fit."""
        if entries is None:
            return msg
        if not isinstance(entries, list):
            raise BadMessage("codecs is not a list")
        tensors, pos = [], 0
        for entry in entries:
            if entry is None:
                if pos >= len(msg.tensors):
                    raise BadMessage("codecs lists more tensors than the message has")
                tensors.append(msg.tensors[pos])
                pos += 1
                continue
            codec, dtype, shape = _check_entry(entry, limits)
            parts = msg.tensors[pos : pos + _PARTS[codec]]
            expected = _expected_parts(codec, shape)
            if [(p.dtype, p.numel()) for p in parts] != expected:
                raise BadMessage(f"{codec} parts do not fit a tensor of shape {shape}")
            tensor = decode(parts, codec, dtype, shape)
            if not bool(torch.isfinite(tensor).all()):
                raise BadMessage(f"a {codec} tensor decodes to non-finite values")
            tensors.append(tensor)
            pos += len(parts)
        if pos != len(msg.tensors):
            raise BadMessage("codecs does not account for every tensor of the message")
        msg.tensors = tensors
        return msg


def _encodable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() >= MIN_NUMEL


def _check_entry(entry: Any, limits: MessageLimits) -> tuple[str, torch.dtype, list[int]]:
    ok = isinstance(entry, list) and len(entry) == 3 and entry[0] in _PARTS and isinstance(entry[2], list)
    if not ok or entry[1] not in limits.allowed_dtypes or not all(isinstance(s, int) and s >= 0 for s in entry[2]):
        raise BadMessage(f"malformed codecs entry {entry!r}")
    dtype = getattr(torch, entry[1])
    if not dtype.is_floating_point:
        raise BadMessage(f"codec {entry[0]} decodes to float tensors, not {entry[1]}")
    if math.prod(entry[2]) * dtype.itemsize > limits.max_tensor_bytes:
        raise BadMessage(f"a {entry[0]} tensor of shape {entry[2]} would exceed {limits.max_tensor_bytes} bytes")
    return entry[0], dtype, entry[2]
