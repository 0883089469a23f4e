"""What rollout workers call to get rewards: :class:`RewardClient`, a :class:`RewardSink`.

``submit`` returns at once; the images are scored in the background while the sampler keeps
denoising, and ``gather`` waits for the scores (DESIGN.md §1). Two transports:

* **Serve** (inside the job): one ``DeploymentHandle.score`` call per image, numpy arrays passed
  as they are — the replica's micro-batcher (:mod:`reward_server.batcher`) batches images from
  every worker.
* **HTTP** (an external reward server, ``reward.endpoint``): one ``POST /score`` per chunk of
  ``max_images_per_request`` images, the msgpack body of DESIGN.md §3, bearer token if set.

Failures: each request (an image on Serve, a chunk on HTTP) is retried with exponential backoff
and full jitter while its deadline (``timeout_s`` from ``submit``, retries included) and
``max_retries`` allow — but only retryable errors: other 5xx, Serve back-pressure, a dropped
connection. An *unavailable* service (a replica that died and restarts, nothing listening, 503
with its Retry-After honoured) is waited for: those attempts do not use up ``max_retries``, and
the deadline stretches by up to ``recovery_timeout_s`` (a real VLM replica takes minutes to
load). A 4xx (bad input) fails at once. A score that cannot be obtained raises
:class:`RewardError` naming the image ids; ±inf or out-of-range scores, or ids that come back
different from the ids sent, are errors too — never a silent 0. An image the reward model cannot
score (its answer is NaN, or not a number: deterministic, so never retried) comes back as NaN;
the driver masks its trajectory and fails the run only above ``reward.max_invalid_fraction``.

    client = RewardClient.from_handle(handle, timeout_s=60, max_retries=3)
    h = client.submit(images, ids)        # uint8 [N, H, W, 3]; returns at once
    scores, = client.gather([h])          # float32 [N] in [0, 1]

Inside Ray actors, build it with :func:`make_reward_sink_factory` (a picklable zero-arg
callable the RolloutWorker calls in its constructor).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np

from common.reward_sink import RewardError, check_scores, show_ids

__all__ = [
    "HTTPTransport",
    "RewardClient",
    "RewardError",
    "RewardSinkFactory",
    "ServeTransport",
    "make_reward_sink_factory",
]


#: Seconds past an attempt's deadline a transport may take to classify its own timeout.
_CLASSIFY_GRACE_S = 5.0


class _Retryable(Exception):
    """A failure worth another attempt (server-side, transient)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _Fatal(Exception):
    """A failure another attempt cannot fix (bad input, protocol mismatch, garbage scores)."""


class _Unscorable(Exception):
    """The model's answer for this image is not a score (deterministic): NaN, never retried."""


class _Unavailable(_Retryable):
    """The service is not there right now (a replica died or restarts, nothing listens, 503):
    retried within ``recovery_timeout_s`` without using up ``max_retries``."""


def _check_scores(
    ids: Sequence[str], got_ids: Sequence[str], scores: Sequence[float]
) -> np.ndarray:
    """Echoed ids must equal the ids sent (same order); scores finite, in [0, 1]."""
    if list(got_ids) != list(ids):
        raise _Fatal(
            f"the service answered for ids {show_ids(got_ids)}, not the ids sent {show_ids(ids)}"
        )
    # NaN is the service's word for "unscorable" (the model's answer for that image is not a
    # score: deterministic, not retried); the caller masks those trajectories. Anything else
    # outside [0, 1] (±inf, 1.5) is garbage from a broken service.
    return check_scores(scores, len(ids), nan_ok=True, ids=list(ids), source="the service", error=_Fatal)


# ------------------------------------------------------------------------------------ transports
class Transport(Protocol):
    #: Images per request (1 on Serve: each image is its own request and retried on its own).
    chunk_size: int

    async def score(self, images: list[np.ndarray], ids: list[str], timeout_s: float) -> np.ndarray:
        """One attempt: float32 [N] scores; raises _Retryable or _Fatal."""
        ...

    async def aclose(self) -> None: ...


class ServeTransport:
    """Calls ``IQAScorer.score(image, id)`` through a Serve ``DeploymentHandle``."""

    chunk_size = 1

    def __init__(self, handle: Any):
        self.handle = handle
        #: Scores received per reward-model version (drained by RewardClient.drain_versions).
        self.versions: Counter[str] = Counter()

    async def score(self, images: list[np.ndarray], ids: list[str], timeout_s: float) -> np.ndarray:
        (image,), (image_id,) = images, ids
        sent_at = time.time()
        response = self.handle.score.remote(image, image_id)
        try:
            # A little inside the caller's deadline, so a timeout here can be told apart: a
            # request sent while no replica is up waits in Serve's router instead of failing.
            scored = await asyncio.wait_for(_await_response(response), max(timeout_s * 0.9, timeout_s - 0.5))
        except TimeoutError:
            response.cancel()  # the deadline passed: do not leave the request queued
            # Serve's controller notices a dead replica only at its next health check (~10 s);
            # meanwhile requests wait in the router. A replica that answers a ping is up (the
            # scorer itself is slow: a real timeout); none answering means none is serving.
            started_at = await self._ping(2.0)
            if started_at is None:
                why = "no reward replica answered a ping"
            elif started_at > sent_at:  # the request waited through a restart (in the router)
                why = "the replica serving now started after this request was sent"
            else:
                try:
                    why = await asyncio.wait_for(asyncio.to_thread(self._recovering), 2.5)
                except TimeoutError:  # a controller too busy to answer: it is handling a failure
                    why = "the Serve controller did not answer within 2.5 s"
            if why:
                raise _Unavailable(f"no answer within the deadline: {why}") from None
            raise
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as err:
            verdict = _classify_ray_error(err)
            if isinstance(verdict, _Unscorable):  # the model's answer is not a score: NaN, masked
                return np.full(1, np.nan, np.float32)
            raise verdict from err
        arr = _check_scores(ids, [scored[0]], [scored[1]])
        self.versions[getattr(scored, "version", None) or "unknown"] += 1
        return arr

    async def _ping(self, timeout_s: float) -> float | None:
        """When the replica that answers ``IQAScorer.info`` within ``timeout_s`` started (Unix
        seconds; -inf if it does not say), or None when none answers."""
        response = self.handle.info.remote()
        try:
            info = await asyncio.wait_for(_await_response(response), timeout_s)
        except Exception:  # noqa: BLE001 — a timeout, a dead replica: nobody answered
            response.cancel()
            return None
        try:
            return float(info.get("started_at", "-inf"))
        except (AttributeError, TypeError, ValueError):
            return float("-inf")

    def _recovering(self) -> str | None:
        """Why the reward deployment is not serving right now (a replica starting or
        recovering, the deployment not healthy), or None when it looks healthy (or cannot be
        asked: then a timeout is a timeout)."""
        try:
            from ray import serve

            app = getattr(self.handle, "app_name", None) or "reward"
            name = getattr(self.handle, "deployment_name", None)
            deployments = serve.status().applications[app].deployments
            dep = deployments[name] if name in deployments else next(iter(deployments.values()))
        except Exception:  # noqa: BLE001 — no controller to ask, an unknown app: not a recovery
            return None
        states = {str(k).split(".")[-1]: v for k, v in (dep.replica_states or {}).items()}
        status = str(dep.status).split(".")[-1]
        if status != "HEALTHY" or any(k != "RUNNING" and v for k, v in states.items()):
            return f"the reward deployment is {status} (replicas {states})"
        return None

    async def aclose(self) -> None:
        pass


async def _await_response(response: Any) -> Any:
    return await response


def _classify_ray_error(err: BaseException) -> Exception:
    """Serve/Ray exceptions -> retryable (replica died, back-pressure, server error) or fatal."""
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    from reward_server.factory import ScoreFailed

    msg = f"{type(err).__name__}: {err}".strip()
    if isinstance(err, rex.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, ScoreFailed):
            return _classify_ray_error(cause)
        return _Retryable(msg[:2000])  # an unexpected error in the replica: like a 5xx
    if isinstance(err, ScoreFailed):  # the replica's own verdict: bad input is not retried
        if err.kind == "bad_input":
            return _Fatal(str(err))
        return _Unscorable(str(err)) if err.kind == "unscorable" else _Retryable(str(err))
    unavailable = (
        rex.RayActorError,  # includes ActorDiedError / ActorUnavailableError: a replica died
        sex.DeploymentUnavailableError,
        ConnectionError,
    )
    for name in ("ReplicaUnavailableError",):
        if hasattr(sex, name):
            unavailable += (getattr(sex, name),)
    if isinstance(err, unavailable):
        return _Unavailable(msg[:2000])
    retryable = (
        rex.ObjectLostError,
        rex.TaskCancelledError,
        rex.GetTimeoutError,
        sex.BackPressureError,
    )
    if hasattr(sex, "RequestCancelledError"):
        retryable += (sex.RequestCancelledError,)
    if isinstance(err, retryable):
        return _Retryable(msg[:2000])
    return _Fatal(msg[:2000])


class HTTPTransport:
    """``POST {endpoint}/score`` with the msgpack body of DESIGN.md §3 (aiohttp)."""

    def __init__(
        self, endpoint: str, auth_token: str | None = None, max_images_per_request: int = 64
    ):
        self.url = endpoint.rstrip("/") + "/score"
        self.chunk_size = max_images_per_request
        self.headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
        #: Scores received per reward-model version (drained by RewardClient.drain_versions).
        self.versions: Counter[str] = Counter()
        if auth_token:
            self.headers["Authorization"] = f"Bearer {auth_token}"
        self._session: Any = None

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def score(self, images: list[np.ndarray], ids: list[str], timeout_s: float) -> np.ndarray:
        import aiohttp

        from common.types import ImageItem, ScoreRequest
        from common.wire import WireError, decode_score_response, encode_score_request

        try:
            body = encode_score_request(
                ScoreRequest(tuple(ImageItem(i, im) for i, im in zip(ids, images)))
            )
        except (ValueError, WireError) as err:  # ShapeError is a ValueError
            raise _Fatal(str(err)) from None
        try:
            async with self._get_session().post(
                self.url,
                data=body,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                payload = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:  # aiohttp's total timeout: the attempt's deadline passed
            raise
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as err:  # nothing listens
            raise _Unavailable(f"{type(err).__name__}: {err}") from None
        except (aiohttp.ClientError, ConnectionError, OSError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        if status == 200:
            try:
                out = decode_score_response(payload)
            except WireError as err:
                raise _Fatal(f"undecodable response from {self.url}: {err}") from None
            arr = _check_scores(ids, out.ids, out.scores)
            self.versions[out.version or "unknown"] += len(arr)
            return arr
        text = payload[:500].decode("utf-8", "replace")
        message = f"HTTP {status} from {self.url}: {text}"
        if status == 503 or status >= 500 or status == 429:
            after = None
            if retry_after is not None:
                try:
                    after = float(retry_after)
                except ValueError:
                    after = None
            raise (_Unavailable if status == 503 else _Retryable)(message, after)
        raise _Fatal(message)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


# ------------------------------------------------------------------------------------ the client
class RewardClient:
    """A :class:`common.reward_sink.RewardSink` backed by the reward service.

    Args:
        transport: :class:`ServeTransport` or :class:`HTTPTransport`.
        timeout_s: deadline of one ``submit``, from the call, retries included.
        max_retries: retries per request after the first attempt.
        backoff_base_s, backoff_max_s: retry k waits U(0, min(max, base·2^k)) ("full jitter"),
            or the server's Retry-After when that is longer; never past the deadline.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        recovery_timeout_s: float = 0.0,
        seed: int | None = None,
    ):
        if timeout_s <= 0 or max_retries < 0 or recovery_timeout_s < 0:
            raise ValueError(
                f"timeout_s must be > 0, max_retries >= 0 and recovery_timeout_s >= 0, got {timeout_s}, "
                f"{max_retries}, {recovery_timeout_s}"
            )
        self.transport = transport
        self.timeout_s = timeout_s
        self.recovery_timeout_s = recovery_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="reward-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        #: Attempts that failed and were retried (for tests and logs).
        self.retries = 0
        #: Attempts that found the service unavailable (retried within recovery_timeout_s).
        self.unavailable = 0

    @classmethod
    def from_handle(cls, handle: Any, **kwargs: Any) -> RewardClient:
        return cls(ServeTransport(handle), **kwargs)

    @classmethod
    def from_endpoint(
        cls,
        endpoint: str,
        auth_token: str | None = None,
        max_images_per_request: int = 64,
        **kwargs: Any,
    ) -> RewardClient:
        return cls(HTTPTransport(endpoint, auth_token, max_images_per_request), **kwargs)

    # -- RewardSink ------------------------------------------------------------------------
    def submit(self, images: np.ndarray, ids: Sequence[str]) -> concurrent.futures.Future:
        """Start scoring ``images`` uint8 [N, H, W, 3] (or a list of [H, W, 3]); returns a future
        of float32 [N] scores at once."""
        if self._closed:
            raise RewardError("RewardClient.submit after close()")
        ids = [str(i) for i in ids]
        images = [np.ascontiguousarray(im) for im in images]
        if len(images) != len(ids):
            raise ValueError(f"submit: {len(images)} images but {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError(
                "submit: ids must be unique within one call (scores are matched by id)"
            )
        deadline = time.monotonic() + self.timeout_s
        return asyncio.run_coroutine_threadsafe(self._score_all(images, ids, deadline), self._loop)

    def gather(self, handles: Sequence[concurrent.futures.Future]) -> list[np.ndarray]:
        """Wait for each handle; float32 [N] scores per handle, NaN where the reward model's
        answer for an image was not a score (unscorable: the caller masks it). Raises RewardError."""
        out = []
        for h in handles:
            # Each request ends by its own deadline (an outage may extend it by up to
            # recovery_timeout_s); the margin only covers the hand-off.
            wait_s = self.timeout_s + self.recovery_timeout_s + 30.0
            try:
                out.append(h.result(timeout=wait_s))
            except concurrent.futures.TimeoutError:
                raise RewardError(
                    f"reward request still pending {wait_s:.0f} s after submit, past its "
                    "deadline (client event loop stuck?)"
                ) from None
        return out

    def score(self, images: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """Blocking convenience: ``gather([submit(images, ids)])[0]``."""
        return self.gather([self.submit(images, ids)])[0]

    def drain_versions(self) -> dict[str, int]:
        """{reward-model version: scores received} since the last call (then reset). Call it after
        ``gather``: every score of a trajectory batch is then counted."""
        versions = getattr(self.transport, "versions", None)
        if versions is None:
            return {}
        out = dict(versions)
        versions.clear()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.transport.aclose(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the retry loop ------------------------------------------------------------------------
    async def _score_all(
        self, images: list[np.ndarray], ids: list[str], deadline: float
    ) -> np.ndarray:
        n = self.transport.chunk_size
        chunks = [(images[i : i + n], ids[i : i + n]) for i in range(0, len(ids), n)]
        results = await asyncio.gather(
            *(self._score_chunk(im, ci, deadline) for im, ci in chunks), return_exceptions=True
        )
        failed = [(ci, r) for (_, ci), r in zip(chunks, results) if isinstance(r, BaseException)]
        if failed:
            bad_ids = [i for ci, _ in failed for i in ci]
            reasons = sorted({str(r) for _, r in failed})
            raise RewardError(
                f"no reward for {len(bad_ids)} of {len(ids)} image(s), ids {show_ids(bad_ids)}: "
                + " | ".join(reasons[:3])
                + (f" | … ({len(reasons) - 3} more reasons)" if len(reasons) > 3 else "")
            )
        return np.concatenate(results) if results else np.zeros(0, np.float32)

    async def _score_chunk(
        self, images: list[np.ndarray], ids: list[str], deadline: float
    ) -> np.ndarray:
        """One request with its retries. ``deadline``: ``timeout_s`` after ``submit``. While the
        service is unavailable (a replica died and restarts, nothing listens, 503) the request
        keeps trying without using up ``max_retries``, and each attempt after an outage gets a
        fresh ``timeout_s`` — but never past ``timeout_s + recovery_timeout_s`` after submit."""
        hard_deadline = deadline + self.recovery_timeout_s
        attempt = 0  # retries used (max_retries bounds them)
        outage = 0  # consecutive attempts that found the service unavailable
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardError(
                    f"deadline of {self.timeout_s:g} s passed before attempt {attempt + outage + 1}"
                )
            try:
                # The transport enforces ``remaining`` itself; the grace lets it tell a dead
                # service from a slow one after its own timeout (ServeTransport pings).
                return await asyncio.wait_for(
                    self.transport.score(images, ids, remaining), remaining + _CLASSIFY_GRACE_S
                )
            except _Fatal as err:
                raise RewardError(str(err)) from None
            except TimeoutError:
                if outage == 0 or time.monotonic() >= hard_deadline:
                    raise RewardError(
                        f"deadline of {self.timeout_s:g} s passed during attempt {attempt + outage + 1}"
                        + (f" (the service was unavailable; recovery_timeout_s {self.recovery_timeout_s:g} s)"
                           if outage else "")
                    ) from None
                err: _Retryable = _Unavailable("no answer while the service recovers")
            except _Retryable as caught:
                err = caught
            if isinstance(err, _Unavailable):
                outage += 1
                k = outage - 1
                # The attempt after an outage gets its own timeout_s, within the recovery window.
                deadline = min(hard_deadline, max(deadline, time.monotonic() + self.timeout_s))
                self.unavailable += 1
            else:
                if attempt >= self.max_retries:
                    raise RewardError(f"gave up after {attempt + 1} attempt(s): {err}") from None
                k = attempt
                attempt += 1
            delay = self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**k))
            if err.retry_after_s is not None:
                delay = max(delay, err.retry_after_s)
            remaining = deadline - time.monotonic()
            if delay >= remaining:
                raise RewardError(
                    f"deadline of {self.timeout_s:g} s"
                    + (f" (+ recovery_timeout_s {self.recovery_timeout_s:g} s)" if outage else "")
                    + f" leaves no time to retry after: {err}"
                ) from None
            self.retries += 1
            await asyncio.sleep(delay)


# ------------------------------------------------------------------------------------ factory
@dataclass(frozen=True)
class RewardSinkFactory:
    """Picklable zero-arg callable that builds a :class:`RewardClient` where it is called (in a
    RolloutWorker actor). Transport: ``handle`` if given, else HTTP to ``endpoint`` if given,
    else the handle of the Serve app ``app_name``."""

    handle: Any = None
    endpoint: str | None = None
    auth_token: str | None = None
    app_name: str = "reward"
    timeout_s: float = 60.0
    max_retries: int = 3
    max_images_per_request: int = 64
    recovery_timeout_s: float = 0.0

    def __call__(self) -> RewardClient:
        kwargs = {"timeout_s": self.timeout_s, "max_retries": self.max_retries,
                  "recovery_timeout_s": self.recovery_timeout_s}
        if self.handle is not None:
            return RewardClient.from_handle(self.handle, **kwargs)
        if self.endpoint is not None:
            return RewardClient.from_endpoint(
                self.endpoint, self.auth_token, self.max_images_per_request, **kwargs
            )
        from reward_server.serve_app import get_handle

        return RewardClient.from_handle(get_handle(self.app_name), **kwargs)

    def __repr__(self) -> str:  # never print the token
        where = (
            "handle"
            if self.handle is not None
            else (self.endpoint or f"serve app {self.app_name!r}")
        )
        return (f"RewardSinkFactory({where}, timeout_s={self.timeout_s}, max_retries={self.max_retries}, "
                f"recovery_timeout_s={self.recovery_timeout_s})")


def make_reward_sink_factory(
    reward: Any, handle: Any = None, app_name: str = "reward"
) -> RewardSinkFactory:
    """The RolloutWorker's ``reward_sink_factory`` from a ``RewardConfig``: Serve ``handle`` if
    given, else ``reward.endpoint`` over HTTP, else the running Serve app ``app_name``."""
    return RewardSinkFactory(
        handle=handle,
        endpoint=reward.endpoint,
        auth_token=reward.auth_token,
        app_name=app_name,
        timeout_s=reward.timeout_s,
        max_retries=reward.max_retries,
        max_images_per_request=reward.max_images_per_request,
        recovery_timeout_s=reward.recovery_timeout_s,
    )
