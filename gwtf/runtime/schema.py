"""The runtime's RPC schema, in one place: the meta fields each handler reads and the tensors it carries, used by
the validators of relays and data nodes and by the builders of what they send.

Relay handlers (all ack on receipt; the work runs after the ack):
    forward      input activation of microbatch (origin, id, attempt) with its route; compute, pass it on
    backward     gradient of this stage's output; backward, pass the input gradient to the previous hop
    recompute    input activation + output gradient, for a microbatch whose replica died after its forward
    resend       "your output of this microbatch, please, to this new replica, with this gradient"
    regrad       "the replica before you died during its backward: recover it with the gradient you sent it"
    release      "this microbatch was restarted: drop what you hold of its earlier attempts"
    end_iteration, advance, get_state, and a recovery strategy's own (redundant: get_shadow)
    resync       "your weights differ from your stage's majority: download the state from these replicas"
Data node handlers (what relays send back):
    head         stage S's output of a microbatch          embed_grad  stage 1's input gradient
    route        "my next hop died: give me another"       recover     "this replica died after its forward"
    fail         "I found no live next hop"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gwtf.errors import BadMessage
from gwtf.transport import Message

ROUTED = ("route", "order", "origin", "attempt")  # a microbatch on its route


@dataclass(frozen=True)
class Rpc:
    meta: tuple[str, ...] = ()  # meta fields the handler reads: a message without them is refused
    tensors: int | None = None  # tensors it carries (None: not checked here)


RELAY: dict[str, Rpc] = {
    "forward": Rpc(ROUTED, tensors=1),
    "backward": Rpc(ROUTED, tensors=1),
    "recompute": Rpc(ROUTED, tensors=2),
    "regrad": Rpc(ROUTED),
    "resend": Rpc(ROUTED),
    "release": Rpc(("origin", "attempt")),
    "get_shadow": Rpc(("stage",)),
    "get_shadow_step": Rpc(("stage", "version"), tensors=0),
    "resync": Rpc(("donors", "hash"), tensors=0),
}
DATA: dict[str, Rpc] = {
    "head": Rpc(("route", "attempt"), tensors=1),
    "embed_grad": Rpc(("route", "attempt"), tensors=1),
    "route": Rpc(("position", "dead"), tensors=0),
    "recover": Rpc(("route", "attempt", "dead_pos", "dead"), tensors=1),
    "fail": Rpc(("attempt",), tensors=0),
}
ACTIVATIONS = ("forward", "backward", "recompute")  # relay handlers whose tensors are (batch, seq, d_model) float32
STATE = ("get_state", "get_shadow")  # handlers that may name the parameters they want


def check_meta(table: dict[str, Rpc], handler: str, msg: Message) -> None:
    """BadMessage unless `msg` has every meta field `handler` reads."""
    missing = [f for f in table.get(handler, Rpc()).meta if f not in msg.meta]
    if missing:
        raise BadMessage(f"{handler} needs meta field(s) {', '.join(missing)}")


def check_tensor_count(table: dict[str, Rpc], handler: str, msg: Message) -> None:
    expected = table.get(handler, Rpc()).tensors
    if expected is not None and len(msg.tensors) != expected:
        raise BadMessage(f"{handler} carries {expected} tensor(s), got {len(msg.tensors)}")


def check_names(handler: str, msg: Message) -> None:
    """A state request's parameter names, if it lists any, are a list of strings."""
    names = msg.meta.get("names") if handler in STATE else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise BadMessage(f"{handler}: names must be a list of parameter names")


def routed(route: list[str], order: Any, origin: Any, attempt: Any) -> dict[str, Any]:
    """The meta of a microbatch on its route: one replica per position, the stage at each position (CheckFree+ swaps
    some), the data node it came from and its attempt."""
    return {"route": list(route), "order": order, "origin": origin, "attempt": attempt}


def timing(entries: Any, peer: str, serve_s: float | None, callee: str | None, call_s: float | None) -> list:
    """The backward leg's `timing` meta, for routers that learn from whole calls timed at the caller (SWARM):
    one [replica, serve_s, call_s] per replica, where serve_s (queue + compute, from the forward's arrival until its
    output was ready) is the replica's own and call_s (the forward call into it, transfer included) its caller's.
    `peer` appends its entry (None: nothing timed, a recomputation) and fills in the call it made into `callee`."""
    out = [list(e) for e in entries if isinstance(e, list) and len(e) == 3] if isinstance(entries, list) else []
    for e in out:
        if e[0] == callee and e[2] is None:
            e[2] = call_s
    if serve_s is not None:
        out.append([peer, serve_s, None])
    return out


def call_times(meta: dict[str, Any]) -> list[tuple[str, float]]:
    """(replica, seconds of the whole forward call into it) from a backward leg's `timing` meta; malformed or
    incomplete entries are left out (a router must not learn from them)."""
    out = []
    for e in meta.get("timing") or []:
        if isinstance(e, list) and len(e) == 3 and isinstance(e[0], str):
            serve_s, call_s = e[1], e[2]
            if all(isinstance(v, int | float) and 0 <= v < 1e6 for v in (serve_s, call_s)):
                out.append((e[0], float(serve_s) + float(call_s)))
    return out


def recovering(meta: dict[str, Any], dead_pos: int, dead: str) -> dict[str, Any]:
    """A microbatch's routed meta for a `recover`: the replica at position `dead_pos` of its route died after its
    forward."""
    return {**meta, "dead_pos": dead_pos, "dead": dead}


def released(origin: str, attempt: int) -> dict[str, Any]:
    """The meta of a release: drop what is held of `origin`'s microbatch up to this attempt."""
    return {"origin": origin, "attempt": attempt}
