"""The standalone reward service: HTTP + msgpack, outside Ray (DESIGN.md §3).

    python -m reward_server --config deploy/configs/demo_cpu.yaml --set reward.port=8710

Endpoints:

* ``POST /score`` — body: the msgpack ``ScoreRequest`` of DESIGN.md §3 (``Content-Type:
  application/msgpack``), decoded strictly by :func:`common.wire.decode_score_request` with the
  config's caps; answer: the msgpack ``ScoreResponse``.
* ``GET /healthz`` — ``{"status": "ok", "model", "version", "queue"}`` (JSON); 503 with
  ``"status": "degraded"`` while a scorer call has run longer than ``scorer_stall_s`` (a stuck
  engine: a load balancer or Kubernetes probe then stops sending traffic / restarts it).
* ``GET /metrics`` — Prometheus text (own registry; names of :mod:`common.telemetry`).

Status codes of ``POST /score`` (errors carry JSON ``{"error": message, "kind": kind}``):

====  =============  =================================================================
200   —              scores (msgpack ScoreResponse); NaN for an image the model cannot score
                     (its answer is NaN or not a number: deterministic, counted as
                     ``unscorable``; the client masks that trajectory, never retries it)
400   malformed      not msgpack, trailing bytes, missing/unknown fields, duplicate ids
400   type           a field of the wrong type (``images`` not a list, ``id`` not a str)
401   unauthorized   bearer token missing or wrong (only when ``auth_token`` is set)
408   timeout        the body did not arrive within ``body_timeout_s``
413   too_large      body over ``max_request_bytes`` (Content-Length or bytes read), an
                     image over ``max_image_pixels``
413   too_many       more than ``max_images_per_request`` images
415   content_type   Content-Type is not application/msgpack
422   dtype          ``dtype`` other than "uint8"
422   shape          shape not [H, W, 3] (non-RGB), data length ≠ H·W·3, no images
499   aborted        the client went away before its body arrived (nobody reads this answer)
500   scoring        the scorer (engine) failed (never a made-up 0)
500   internal       a bug in the server (the server keeps serving)
503   overloaded     more than ``max_queue`` requests in flight or waiting; ``Retry-After``
====  =============  =================================================================

Slow clients cannot starve the queue: a connection must send its request head within
``header_timeout_s`` (aiohttp's keep-alive timer, armed when the connection opens and after
each answer) and its body within ``body_timeout_s``; a request takes one of the ``max_queue``
slots only once its body has arrived, so connections trickling bytes hold none.

Concurrent requests share scorer calls: the :class:`~reward_server.batcher.MicroBatcher` the Serve
replica uses too collects images from all of them (full batch, the wait, or the adaptive cut of
:mod:`reward_server.batcher`), then runs one (blocking) scorer call in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
from typing import TYPE_CHECKING, Self

from aiohttp import web

from common.types import ScoreResponse
from common.wire import RequestLimits, WireError, decode_score_request, encode_score_response
from reward_server.batcher import MicroBatcher
from reward_server.factory import ScoreFailed

if TYPE_CHECKING:
    from common.config import RewardConfig
    from reward_server.scoring import Scorer

__all__ = ["STATUS_BY_KIND", "BackgroundServer", "MicroBatcher", "RewardHTTPServer", "run_server"]

DEFAULT_REQUEST_LIMITS = RequestLimits()
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

#: HTTP status of each request error kind (``WireError.kind`` and the server's own kinds).
STATUS_BY_KIND: dict[str, int] = {
    "malformed": 400,
    "type": 400,
    "unauthorized": 401,
    "timeout": 408,
    "too_large": 413,
    "too_many": 413,
    "content_type": 415,
    "dtype": 422,
    "shape": 422,
    "aborted": 499,
    "unscorable": 200,  # counted, answered with NaN for that image (see the table above)
    "scoring": 500,
    "internal": 500,
    "overloaded": 503,
}


class _RequestError(Exception):
    def __init__(self, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.kind = kind
        self.headers = headers or {}


def aiohttp_payload_errors() -> tuple[type[BaseException], ...]:
    """What reading a request body raises when the client goes away mid-body."""
    import aiohttp

    return (aiohttp.ClientConnectionResetError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
            asyncio.IncompleteReadError)


# ------------------------------------------------------------------------------------ metrics
class _Metrics:
    """prometheus_client metrics in an own registry (names from common.telemetry)."""

    def __init__(self, backend: str):
        import prometheus_client as pc

        from common.telemetry import prometheus_metric

        self.registry = pc.CollectorRegistry()
        self.backend = backend
        self.images = prometheus_metric("reward_images_total", self.registry)
        self.batch_size = prometheus_metric("reward_batch_size", self.registry)
        self.latency = prometheus_metric("reward_latency_seconds", self.registry)
        self.queue = prometheus_metric("reward_queue_depth", self.registry)
        self.errors = prometheus_metric("reward_errors_total", self.registry)
        for kind in STATUS_BY_KIND:  # every kind shows up (at 0) from the first scrape
            self.errors.labels(kind=kind)
        self.images.labels(backend=backend)

    def batch(self, size: int, seconds: float, ok: int) -> None:
        self.batch_size.labels(backend=self.backend).observe(size)
        self.latency.labels(backend=self.backend).observe(seconds)
        self.images.labels(backend=self.backend).inc(ok)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> tuple[bytes, str]:
        import prometheus_client as pc

        return pc.generate_latest(self.registry), pc.CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------------ server
class RewardHTTPServer:
    """The aiohttp application of the standalone reward service.

    Args:
        scorer: any :class:`reward_server.scoring.Scorer` (blocking ``score``).
        max_batch_size, batch_wait_timeout_s, adaptive_batch_wait: micro-batching of concurrent
            requests (:class:`reward_server.batcher.MicroBatcher`).
        max_queue: requests in flight or waiting beyond which ``/score`` answers 503.
        limits: request caps (images, pixels, bytes).
        auth_token: bearer token ``/score`` requires; None: no auth.
        header_timeout_s, body_timeout_s: read deadlines (module docstring).
        scorer_stall_s: a scorer call longer than this makes ``/healthz`` degraded.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.05,
        adaptive_batch_wait: bool = True,
        max_queue: int = 256,
        limits: RequestLimits = DEFAULT_REQUEST_LIMITS,
        auth_token: str | None = None,
        header_timeout_s: float = 15.0,
        body_timeout_s: float = 60.0,
        scorer_stall_s: float = 300.0,
    ):
        self.scorer = scorer
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.scorer_stall_s = scorer_stall_s
        self.limits = limits
        self.max_queue = max_queue
        self._token = auth_token.encode() if auth_token else None
        self.metrics = _Metrics(scorer.name)
        self.batcher = MicroBatcher(scorer, max_batch_size, batch_wait_timeout_s, self.metrics,
                                    adaptive=adaptive_batch_wait)
        self.pending = 0  # /score requests admitted and not yet answered

    @classmethod
    def from_config(cls, reward: RewardConfig, scorer: Scorer) -> RewardHTTPServer:
        return cls(
            scorer,
            max_batch_size=reward.max_batch_size,
            batch_wait_timeout_s=reward.batch_wait_timeout_s,
            adaptive_batch_wait=reward.adaptive_batch_wait,
            max_queue=reward.max_queue,
            limits=RequestLimits(
                max_images=reward.max_images_per_request,
                max_image_pixels=reward.max_image_pixels,
                max_request_bytes=reward.max_request_bytes,
            ),
            auth_token=reward.auth_token,
            header_timeout_s=reward.header_timeout_s,
            body_timeout_s=reward.body_timeout_s,
            scorer_stall_s=reward.scorer_stall_s,
        )

    def make_runner(self) -> web.AppRunner:
        """The app's runner; aiohttp's keep-alive timer is the head deadline (it is armed when
        a connection opens, so a client that never finishes its first request head is cut too)."""
        # lingering_time: after an early answer (408, 413) aiohttp keeps reading the unread body
        # for this long (10 s by default) before it closes; a trickling client would hold on.
        return web.AppRunner(self.make_app(), access_log=None, keepalive_timeout=self.header_timeout_s,
                             lingering_time=1.0)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes)
        app.router.add_post("/score", self.handle_score)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/metrics", self.handle_metrics)

        async def _start(_app: web.Application) -> None:
            await self.batcher.start()

        async def _stop(_app: web.Application) -> None:
            await self.batcher.stop()

        app.on_startup.append(_start)
        app.on_cleanup.append(_stop)
        return app

    # -- handlers ------------------------------------------------------------------------------
    async def handle_healthz(self, request: web.Request) -> web.Response:
        body: dict[str, object] = {
            "status": "ok",
            "model": self.scorer.name,
            "version": self.scorer.version,
            "queue": self.pending,
        }
        since = self.batcher.busy_since
        if since is not None and time.monotonic() - since > self.scorer_stall_s:
            body["status"] = "degraded"
            body["reason"] = (f"a scorer call has run for {time.monotonic() - since:.0f} s "
                              f"(> scorer_stall_s {self.scorer_stall_s:g} s)")
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def handle_score(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            if request.content_type not in MSGPACK_TYPES:
                raise _RequestError(
                    "content_type",
                    f"Content-Type must be application/msgpack (the body of DESIGN.md §3), got "
                    f"{request.headers.get('Content-Type', '(none)')!r}",
                )
        except _RequestError as err:
            return self._error(err, close=True)  # the body was not read: do not reuse the connection
        try:
            # The body first, under its deadline: a request waiting for its bytes holds no slot.
            body = await asyncio.wait_for(self._read_body(request), self.body_timeout_s)
        except TimeoutError:
            return self._error(_RequestError(
                "timeout", f"the request body did not arrive within body_timeout_s ({self.body_timeout_s:g} s)"
            ), close=True)
        except _RequestError as err:
            return self._error(err, close=err.kind == "too_large")
        except (ConnectionError, *aiohttp_payload_errors()) as err:
            return self._error(_RequestError("aborted", f"client went away mid-body: {type(err).__name__}"),
                               close=True)
        if self.pending >= self.max_queue:
            return self._error(_RequestError(
                "overloaded",
                f"overloaded: {self.pending} requests in flight or waiting (max_queue {self.max_queue}); "
                "retry later",
                {"Retry-After": str(self._retry_after_s())},
            ))
        self.pending += 1
        self.metrics.queue.set(self.pending)
        try:
            return await self._score(body)
        except _RequestError as err:
            return self._error(err)
        except Exception as err:  # noqa: BLE001 — a bug must not take the server down
            return self._error(
                _RequestError("internal", f"internal error: {type(err).__name__}: {err}")
            )
        finally:
            self.pending -= 1
            self.metrics.queue.set(self.pending)

    async def _score(self, body: bytearray) -> web.Response:
        try:
            req = decode_score_request(body, self.limits)
        except WireError as err:
            raise _RequestError(
                err.kind if err.kind in STATUS_BY_KIND else "malformed", str(err)
            ) from None
        ids = [item.id for item in req.images]
        results = await self.batcher.score(ids, [item.pixels for item in req.images])
        failed = [r for r in results if isinstance(r, ScoreFailed) and r.kind != "unscorable"]
        if failed:
            raise _RequestError(
                "scoring",
                f"no reward for {len(failed)} of {len(ids)} image(s): "
                + "; ".join(str(f) for f in failed[:4]),
            )
        nan5 = (math.nan,) * 5
        unscorable = sum(isinstance(r, ScoreFailed) for r in results)
        for _ in range(unscorable):
            self.metrics.error("unscorable")
        scores = tuple(math.nan if isinstance(r, ScoreFailed) else r.score for r in results)
        levels = [nan5 if isinstance(r, ScoreFailed) else r.levels for r in results]
        has_levels = all(row is not None for row in levels) and unscorable < len(results)
        resp = ScoreResponse(
            ids=tuple(ids),
            scores=scores,
            levels=tuple(levels) if has_levels else None,  # type: ignore[arg-type]
            model=self.scorer.name,
            version=self.scorer.version,
        )
        return web.Response(body=encode_score_response(resp), content_type="application/msgpack")

    # -- helpers -------------------------------------------------------------------------------
    def _check_auth(self, request: web.Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # Constant-time comparison: the time taken does not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise _RequestError(
                "unauthorized",
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                {"WWW-Authenticate": 'Bearer realm="reward"'},
            )

    async def _read_body(self, request: web.Request) -> bytearray:
        """The body, never more than ``max_request_bytes`` of it (Content-Length checked first,
        then the bytes actually read: a chunked or lying client is cut off too)."""
        cap = self.limits.max_request_bytes
        length = request.content_length
        if length is not None and length > cap:
            raise _RequestError(
                "too_large", f"request body of {length} bytes exceeds the cap of {cap}"
            )
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 20):
            body += chunk
            if len(body) > cap:
                raise _RequestError("too_large", f"request body exceeds the cap of {cap} bytes")
        return body

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: batches waiting × last batch latency."""
        batches = self.pending / max(self.batcher.max_batch_size, 1) + 1
        return max(1, math.ceil(batches * self.batcher.last_latency_s))

    def _error(self, err: _RequestError, close: bool = False) -> web.Response:
        self.metrics.error(err.kind)
        resp = web.Response(
            status=STATUS_BY_KIND[err.kind],
            text=json.dumps({"error": str(err), "kind": err.kind}),
            content_type="application/json",
            headers=err.headers,
        )
        if close:
            resp.force_close()
        return resp


# ------------------------------------------------------------------------------------ running
class BackgroundServer:
    """Runs a :class:`RewardHTTPServer` on its own event loop in a daemon thread (tests,
    benchmarks, notebooks). ``port=0`` picks a free port; ``url`` says which."""

    def __init__(self, server: RewardHTTPServer, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def _up() -> None:
            make_runner = getattr(self.server, "make_runner", None)
            self._runner = make_runner() if make_runner else web.AppRunner(self.server.make_app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        def _main() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(_up())
            except BaseException as err:  # noqa: BLE001 — reported to start()
                failure.append(err)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=_main, name="reward-http", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"reward HTTP server did not start within {timeout_s} s")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def run_server(
    server: RewardHTTPServer, host: str, port: int, stop: asyncio.Event | None = None
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None)."""
    import signal

    runner = server.make_runner()
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    print(
        f"reward server: {server.scorer.name} ({server.scorer.version}) on http://{bound[0]}:{bound[1]} "
        f"(POST /score, GET /healthz, GET /metrics)",
        flush=True,
    )
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
