"""The agents' wire format (router gwtf-p2p): a message is a list `[type name, field, field, ...]` (tuples as
lists, a nested message as its own list), JSON in a call's meta. Decoding checks every field against its dataclass's
declared type, within bounds (MAX_ITEMS entries per tuple, MAX_STR characters per string), and that the message
names the transport-stamped caller as its sender; the agent then checks what it says (stages, slots, numbers).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from gwtf.errors import BadMessage
from gwtf.routing.agent.messages import Message

MAX_ITEMS = 1024  # entries of one tuple field
MAX_STR = 256

MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Message)}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in MESSAGE_TYPES.items()}


def encode(msg: Any) -> list:
    return [type(msg).__name__, *(_plain(getattr(msg, f.name)) for f in dataclasses.fields(msg))]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return encode(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def decode(entry: Any, sender: str | None) -> Any:
    """An agent message from its wire form; BadMessage unless every field has its declared type and, when `sender`
    is given, the message names that peer (the transport-stamped caller) as its sender."""
    if not isinstance(entry, list) or not entry or entry[0] not in MESSAGE_TYPES:
        raise BadMessage("not an agent message")
    cls, hints = MESSAGE_TYPES[entry[0]], _HINTS[entry[0]]
    fields = dataclasses.fields(cls)
    if len(entry) != len(fields) + 1:
        raise BadMessage(f"{entry[0]}: expected {len(fields)} fields, got {len(entry) - 1}")
    msg = cls(*(_typed(v, hints[f.name], f"{entry[0]}.{f.name}") for v, f in zip(entry[1:], fields)))
    if sender is not None and msg.sender != sender:
        raise BadMessage(f"{entry[0]} claims to come from {msg.sender!r}, not from its caller")
    return msg


def _typed(value: Any, tp: Any, where: str) -> Any:
    if tp is int:
        if type(value) is not int:
            raise BadMessage(f"{where}: expected an integer")
        return value
    if tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise BadMessage(f"{where}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or len(value) > MAX_STR:
            raise BadMessage(f"{where}: expected a string of at most {MAX_STR} characters")
        return value
    if isinstance(tp, type) and tp.__name__ in MESSAGE_TYPES:
        inner = decode(value, None)
        if type(inner) is not tp:
            raise BadMessage(f"{where}: expected a {tp.__name__}")
        return inner
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise BadMessage(f"{where}: expected a list of at most {MAX_ITEMS} entries")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise BadMessage(f"{where}: expected {len(args)} entries")
        return tuple(_typed(v, a, where) for v, a in zip(value, args))
    raise BadMessage(f"{where}: field of a type the wire does not carry")
