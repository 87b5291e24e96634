"""The dashboard's web server (aiohttp): a read-only page and `GET /api/state`, fed by a poll of the run's records.

    GET /                 the page (static/index.html), which fetches /api/state every 2 s and draws it
    GET /static/...       its script, style and the vendored chart and graph libraries (no CDN: works offline)
    GET /api/state        the JSON state (gwtf.dashboard.model.RunWatch.state), for the page and for scripts

`Poller` reads the run's live records and the data nodes' telemetry through a `Membership` (blocking calls, in a
thread) once every `poll_s` seconds and hands them to the `RunWatch`; requests are answered from the last state,
so a slow DHT never holds a request up. The page's Content-Security-Policy allows this origin only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from gwtf.dashboard.model import RunWatch
from gwtf.membership import Membership

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 1.0
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class Poller:
    """Reads the run every `poll_s` seconds into `watch`; keeps the last state and the last error (if any)."""

    def __init__(self, watch: RunWatch, membership: Membership, poll_s: float = POLL_S) -> None:
        self.watch, self.membership, self.poll_s = watch, membership, poll_s
        self.state: dict[str, Any] = watch.state()
        self.error: str | None = None
        self.polls = 0

    async def poll_once(self) -> None:
        try:
            records = await asyncio.to_thread(self.membership.live_records)
            telemetry = await asyncio.to_thread(self.membership.telemetry)
            self.watch.observe(records, telemetry)
            self.state = await asyncio.to_thread(self.watch.state)  # the optimum may take a solver a moment
            self.error = None
        except Exception as exc:  # a failed DHT read: the page shows the last state and says why it is old
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("dashboard: reading the run failed (%s); showing the last state", self.error)
        self.polls += 1

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.poll_s - (time.monotonic() - started)))

    def snapshot(self) -> dict[str, Any]:
        return {**self.state, "poll_error": self.error, "polls": self.polls}


def make_app(poller: Poller) -> web.Application:
    """The read-only app: the page, its static files and the JSON state."""

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def api_state(request: web.Request) -> web.Response:
        body = json.dumps(poller.snapshot(), allow_nan=False, separators=(",", ":"))
        return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    @web.middleware
    async def headers(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    app = web.Application(middlewares=[headers])
    app.router.add_get("/", index)
    app.router.add_get("/api/state", api_state)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving `app` on host:port (port 0: any free one); returns the runner and the bound port. OSError
    (port in use, address not on this machine) is the caller's to word."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
