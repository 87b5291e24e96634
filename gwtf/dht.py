"""hivemind's DHT on a thread of the node's own process, instead of the process hivemind.DHT forks for it.

hivemind.DHT is a forked process that runs a DHTNode and answers the node over pipes: every record read and write
pickles its arguments, crosses two pipes and settles an MPFuture through shared memory; and the fork of a node that
has imported torch and transformers kept 27 MB of private pages and a share of the node's heap (a fork's garbage
collector writes to every object it visits, so the pages it touches are copied). DHTNode is hivemind's asyncio API
for using the DHT inside one process; `ThreadDHT` runs one on its own event loop in a daemon thread (a node's calls
into it block on a result, so it cannot share their loop) and offers the part of hivemind.DHT's interface that gwtf
uses: store, get, get_visible_maddrs, replicate_p2p, peer_id, shutdown.

The p2p daemon that the DHTNode starts is now this process's child: `gwtf.lifecycle.end_with_this_process` SIGKILLs
it once this process is gone, SIGKILL included (hivemind's DHT process did that through the watchdog
gwtf.lifecycle installs in forked children).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from gwtf import lifecycle

START_TIMEOUT_S = 120.0  # starting p2pd and bootstrapping from the initial peers (each bounded by hivemind too)
SHUTDOWN_TIMEOUT_S = 10.0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # hivemind's choice for its DHT process, where installed (a hivemind dependency)
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with hivemind
        return asyncio.new_event_loop()


def _shutdown_at_exit(ref: weakref.ref[ThreadDHT]) -> None:
    dht = ref()
    if dht is not None:
        dht.shutdown()


class ThreadDHT:
    """A started DHTNode on its own event loop in a daemon thread of this process (see the module docstring).

    `initial_peers`, `record_validators` and the other keyword arguments mean what they mean to hivemind.DHT (the
    rest go to DHTNode.create and on to P2P.create: host_maddrs, announce_maddrs, identity_path, client_mode...).
    """

    def __init__(self, initial_peers: Sequence[str] | None = None, record_validators: Iterable[Any] = (),
                 start_timeout: float = START_TIMEOUT_S, **kwargs: Any) -> None:  # fmt: skip
        from hivemind.dht.node import DHTNode
        from hivemind.dht.validation import CompositeValidator

        self._loop = _new_loop()
        run = lifecycle.os_named(lifecycle.DHT_THREAD, self._loop.run_forever)
        self._thread = threading.Thread(target=run, name=lifecycle.DHT_THREAD, daemon=True)
        self._thread.start()
        self._closed = False
        self._p2p_replica: Any = None
        validator = CompositeValidator(list(record_validators))
        create = DHTNode.create(initial_peers=list(initial_peers or []), record_validator=validator, **kwargs)
        try:
            self._node = self._submit(create).result(timeout=start_timeout)
        except BaseException:
            self._stop_loop()
            raise
        self.peer_id = self._node.peer_id
        atexit.register(_shutdown_at_exit, weakref.ref(self))  # a process that exits on an error still stops it
        self._p2pd = getattr(self._node.p2p, "_child", None)  # the daemon P2P.create started (an asyncio Process)
        self._release_p2pd: Callable[[], None] = (
            lifecycle.end_with_this_process(self._p2pd.pid) if self._p2pd is not None else (lambda: None)
        )

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise RuntimeError("this DHT was shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None, return_future: bool = False,
              **kwargs: Any) -> Any:  # fmt: skip
        """As hivemind.DHT.store: True once a replica kept the value (a concurrent Future with return_future)."""
        future = self._submit(self._node.store(key, value, expiration_time, subkey=subkey, **kwargs))
        return future if return_future else future.result()

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any) -> Any:
        """As hivemind.DHT.get: the ValueWithExpiration found, or None (a concurrent Future with return_future)."""
        future = self._submit(self._node.get(key, latest=latest, **kwargs))
        return future if return_future else future.result()

    def get_visible_maddrs(self, latest: bool = False) -> list[Any]:
        return self._submit(self._node.get_visible_maddrs(latest=latest)).result(timeout=START_TIMEOUT_S)

    async def replicate_p2p(self) -> Any:
        """A P2P client of this DHT's daemon for the caller's event loop (as hivemind.DHT.replicate_p2p)."""
        from hivemind.p2p import P2P

        if self._p2p_replica is None:
            self._p2p_replica = await P2P.replicate(self._node.p2p.daemon_listen_maddr)
        return self._p2p_replica

    def shutdown(self) -> None:
        """Stop the DHT node and its p2p daemon, then the thread. Idempotent."""
        if self._closed:
            return
        self._release_p2pd()  # a clean stop: the watchdog leaves p2pd to the shutdown below
        try:
            self._submit(self._stop_node()).result(timeout=SHUTDOWN_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a daemon that will not stop is killed here
            if self._p2pd is not None and self._p2pd.returncode is None:
                lifecycle.kill_quietly(self._p2pd.pid)
        finally:
            self._stop_loop()

    async def _stop_node(self) -> None:
        """The node and its daemon, then whatever it left running on the loop (its pending RPCs), cancelled and
        awaited: a loop closed with tasks pending logs "Task was destroyed but it is pending" at exit."""
        await self._node.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SHUTDOWN_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
