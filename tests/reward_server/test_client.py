"""RewardClient: every score arrives or a RewardError names the ids — never a silent 0.

HTTP tests run an in-process server (PIQE scorer); a few use a stub server or a stub scorer
that misbehaves on purpose (NaN, wrong ids, a hang) — each says so. The Serve tests (slow) kill
the replica while requests sit in it and check that retries get every score.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from common.config import RewardConfig
from common.types import ScoreResponse
from common.wire import encode_score_response
from reward_server.client import HTTPTransport, RewardClient, RewardError, make_reward_sink_factory
from reward_server.http_server import BackgroundServer, RewardHTTPServer
from reward_server.scoring import ScoreBatch


@pytest.fixture(scope="module")
def piqe_server(piqe_scorer):
    with BackgroundServer(
        RewardHTTPServer(piqe_scorer, batch_wait_timeout_s=0.01, auth_token="tok")
    ) as bg:
        yield bg


def _stack(images):
    return np.stack(images)


# ------------------------------------------------------------------------------------ HTTP
def test_http_client_scores_match_direct_scoring(piqe_server, piqe_scorer, distinct_images):
    expected = piqe_scorer.score(distinct_images[:10]).scores
    with RewardClient.from_endpoint(
        piqe_server.url, "tok", max_images_per_request=4, timeout_s=30
    ) as client:
        # 10 images in one submit -> 3 POSTs of <= 4 images; plus two more submits in flight.
        h1 = client.submit(_stack(distinct_images[:10]), [f"a{i}" for i in range(10)])
        h2 = client.submit(_stack(distinct_images[3:5]), ["b0", "b1"])
        h3 = client.submit(distinct_images[7:8], ["c0"])
        s1, s2, s3 = client.gather([h1, h2, h3])
    assert s1.dtype == np.float32 and s1.shape == (10,)
    np.testing.assert_allclose(s1, expected, atol=1e-6)
    np.testing.assert_allclose(s2, expected[3:5], atol=1e-6)
    np.testing.assert_allclose(s3, expected[7:8], atol=1e-6)
    assert client.retries == 0


def test_server_stopped_mid_load_and_restarted(piqe_scorer, distinct_images, unused_port):
    """Requests sent while the server is down are retried until it is back: none is lost."""
    images = distinct_images[:24]
    expected = piqe_scorer.score(images).scores

    def start():
        srv = RewardHTTPServer(piqe_scorer, batch_wait_timeout_s=0.01)
        return BackgroundServer(srv, port=unused_port).start()

    server = start()
    client = RewardClient.from_endpoint(server.url, timeout_s=30, max_retries=20, backoff_max_s=0.5)
    try:
        handles = [client.submit(images[i : i + 1], [f"x{i}"]) for i in range(8)]
        client.gather(handles[:1])  # the server answers
        server.stop()  # mid-load: later requests find no server
        handles += [client.submit(images[i : i + 1], [f"x{i}"]) for i in range(8, 24)]
        time.sleep(1.0)
        server = start()  # same port
        scores = np.concatenate(client.gather(handles))
    finally:
        client.close()
        server.stop()
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert client.retries > 0  # the requests sent while it was down were retried


def test_deadline_when_nothing_listens(unused_port):
    """Connection refused forever: RewardError once the deadline passes, not after max_retries."""
    client = RewardClient.from_endpoint(
        f"http://127.0.0.1:{unused_port}", timeout_s=1.5, max_retries=10_000, backoff_max_s=0.2
    )
    start = time.monotonic()
    with client, pytest.raises(RewardError) as err:
        client.score(np.zeros((2, 8, 8, 3), np.uint8), ["lost-0", "lost-1"])
    elapsed = time.monotonic() - start
    assert elapsed < 1.5 + 1.0, elapsed
    assert (
        "lost-0" in str(err.value) and "lost-1" in str(err.value) and "deadline" in str(err.value)
    )
    assert client.retries > 0


class _HangingScorer:
    """Stub scorer (this test only): never answers within the client's deadline."""

    name, version = "stub:hang", "0"

    def __init__(self):
        self.release = threading.Event()

    def score(self, images):
        self.release.wait(30)
        return ScoreBatch(scores=np.full(len(images), 0.5))


def test_deadline_with_a_hung_server(distinct_images):
    scorer = _HangingScorer()
    with BackgroundServer(RewardHTTPServer(scorer, batch_wait_timeout_s=0.0)) as bg:
        client = RewardClient.from_endpoint(bg.url, timeout_s=1.0, max_retries=3)
        start = time.monotonic()
        try:
            with pytest.raises(RewardError, match=r"deadline of 1 s.*|'h0'"):
                client.score(distinct_images[:1], ["h0"])
            assert time.monotonic() - start < 2.0
        finally:
            scorer.release.set()
            client.close()


class _NaNScorer:
    """Stub scorer (this test only): a backend gone bad, NaN for every image."""

    name, version = "stub:nan", "0"

    def __init__(self):
        self.calls = 0

    def score(self, images):
        self.calls += 1
        return type("Batch", (), {"scores": np.full(len(images), np.nan), "levels": None})()


def test_nan_from_the_scorer_comes_back_as_nan_and_is_not_retried(distinct_images):
    """A model whose answer is NaN is deterministic (same image, same weights, same NaN): the
    server answers 200 with NaN for those images (counted as ``unscorable``), the client hands the
    NaN on for the driver to mask, and nothing is retried. It never becomes a made-up score."""
    scorer = _NaNScorer()
    server = RewardHTTPServer(scorer, batch_wait_timeout_s=0.0)
    with (
        BackgroundServer(server) as bg,
        RewardClient.from_endpoint(bg.url, timeout_s=20, max_retries=2, backoff_max_s=0.05) as client,
    ):
        scores = client.score(_stack(distinct_images[:2]), ["n0", "n1"])
        assert np.isnan(scores).all() and scores.shape == (2,)
        assert client.retries == 0 and scorer.calls == 1
    text = server.metrics.render()[0].decode()
    assert 'reward_errors_total{kind="unscorable"} 2.0' in text


class _BrokenEngine:
    """Stub scorer (this test only): the engine itself fails (not the model's answer)."""

    name, version = "stub:broken", "0"

    def __init__(self):
        self.calls = 0

    def score(self, images):
        self.calls += 1
        raise RuntimeError("EngineDeadError: engine core died")


def test_an_engine_failure_is_retried_then_a_reward_error(distinct_images):
    """500 ``scoring`` (the engine failed, maybe transiently): max_retries more tries, then a
    RewardError naming the ids."""
    scorer = _BrokenEngine()
    with (
        BackgroundServer(RewardHTTPServer(scorer, batch_wait_timeout_s=0.0)) as bg,
        RewardClient.from_endpoint(bg.url, timeout_s=20, max_retries=2, backoff_max_s=0.05) as client,
        pytest.raises(RewardError) as err,
    ):
        client.score(_stack(distinct_images[:2]), ["n0", "n1"])
    msg = str(err.value)
    assert "'n0'" in msg and "'n1'" in msg and "EngineDeadError" in msg and "gave up after 3 attempt" in msg
    assert scorer.calls >= 3


class _StubServer:
    """A fake reward server (these tests only) answering 200 with a chosen ScoreResponse."""

    def __init__(self, respond):
        self.respond = respond
        self.bg: BackgroundServer | None = None

    def __enter__(self):
        class _App:
            def make_app(inner):
                app = web.Application()

                async def score(request):
                    await request.read()
                    body = encode_score_response(self.respond())
                    return web.Response(body=body, content_type="application/msgpack")

                app.router.add_post("/score", score)
                return app

        self.bg = BackgroundServer(_App()).start()  # type: ignore[arg-type]
        return self.bg

    def __exit__(self, *exc):
        self.bg.stop()


@pytest.mark.parametrize(
    "response, fragment",
    [
        (ScoreResponse(("a", "b"), (0.5, math.inf), None, "stub", "0"), "non-finite"),
        (ScoreResponse(("a", "b"), (0.5, 1.5), None, "stub", "0"), "out-of-range"),
        (ScoreResponse(("b", "a"), (0.5, 0.5), None, "stub", "0"), "not the ids sent"),
        (ScoreResponse(("a",), (0.5,), None, "stub", "0"), "not the ids sent"),
    ],
    ids=["inf", "out_of_range", "ids_swapped", "id_missing"],
)
def test_bad_responses_are_errors_not_scores(response, fragment):
    with (
        _StubServer(lambda: response) as bg,
        RewardClient.from_endpoint(bg.url, timeout_s=10, max_retries=3) as client,
    ):
        with pytest.raises(RewardError, match=fragment) as err:
            client.score(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"])
        assert client.retries == 0  # garbage from a backend is not retried
    assert "'a'" in str(err.value)


def test_4xx_is_not_retried(piqe_server, distinct_images):
    with RewardClient.from_endpoint(
        piqe_server.url, "wrong", timeout_s=10, max_retries=5
    ) as client:
        with pytest.raises(RewardError, match="HTTP 401"):
            client.score(distinct_images[:1], ["u0"])
        assert client.retries == 0


def test_submit_returns_before_scoring_is_done(distinct_images):
    """submit is non-blocking: it returns while the (stub, slow) scorer still holds the batch."""
    scorer = _HangingScorer()
    with (
        BackgroundServer(RewardHTTPServer(scorer, batch_wait_timeout_s=0.0)) as bg,
        RewardClient.from_endpoint(bg.url, timeout_s=10) as client,
    ):
        start = time.monotonic()
        handle = client.submit(distinct_images[:1], ["s0"])
        assert time.monotonic() - start < 0.5 and not handle.done()
        scorer.release.set()
        (scores,) = client.gather([handle])
    assert scores.tolist() == [0.5]


def test_sink_factory_is_picklable_and_builds_an_http_client(piqe_server, distinct_images):
    cfg = RewardConfig(
        backend="pyiqa", endpoint=piqe_server.url, auth_token="tok", timeout_s=7, max_retries=2
    )
    factory = pickle.loads(pickle.dumps(make_reward_sink_factory(cfg)))
    assert "tok" not in repr(factory)
    client = factory()
    try:
        assert isinstance(client.transport, HTTPTransport)
        assert client.timeout_s == 7 and client.max_retries == 2
        assert client.score(distinct_images[:1], ["f0"]).shape == (1,)
    finally:
        client.close()


# ------------------------------------------------------------------------------------ Serve
@pytest.fixture(scope="module")
def kill_app(serve_session):
    """A piqe app whose batches wait 1 s to fill: requests sit in the replica long enough to be
    killed with it (the fixed wait: the adaptive cut would score them at once)."""
    from reward_server.serve_app import deploy

    cfg = RewardConfig(
        backend="pyiqa",
        max_batch_size=64,
        max_ongoing_requests=64,
        batch_wait_timeout_s=1.0,
        adaptive_batch_wait=False,
        num_cpus_per_replica=0.5,
    )
    handle = deploy(cfg, name="test-client-kill")
    yield cfg, handle
    serve_session.delete("test-client-kill")


@pytest.mark.slow
@pytest.mark.parametrize("lookup", ["handle", "app_name"])
def test_sink_factory_inside_a_ray_actor(
    kill_app, ray_cluster, piqe_scorer, distinct_images, lookup
):
    """The RolloutWorker pattern: the factory travels to an actor, which builds the client in
    its constructor and submits/gathers there — given the handle, or finding the app by name."""
    cfg, handle = kill_app
    factory = (
        make_reward_sink_factory(cfg, handle)
        if lookup == "handle"
        else make_reward_sink_factory(cfg, app_name="test-client-kill")
    )

    @ray_cluster.remote(num_cpus=0)
    class Worker:
        def __init__(self, factory):
            self.sink = factory()

        def run(self, images, ids):
            return self.sink.gather([self.sink.submit(images, ids)])[0]

    worker = Worker.remote(factory)
    images = _stack(distinct_images[:3])
    got = ray_cluster.get(worker.run.remote(images, ["w0", "w1", "w2"]), timeout=60)
    np.testing.assert_allclose(got, piqe_scorer.score(list(images)).scores, atol=1e-6)
    ray_cluster.kill(worker)


@pytest.mark.slow
def test_replica_killed_during_load(kill_app, ray_cluster, piqe_scorer, distinct_images):
    """ray.kill of the replica while 8 requests wait in its batch: the client's retries reach
    the replica Serve starts in its place and every score arrives (or a RewardError would)."""
    _cfg, handle = kill_app
    images = distinct_images[:8]
    expected = piqe_scorer.score(images).scores
    replica = handle.stats.remote().result(timeout_s=30)["replica"]
    with RewardClient.from_handle(
        handle, timeout_s=120, max_retries=10, backoff_max_s=2.0
    ) as client:
        handles = [client.submit(images[i : i + 1], [f"k{i}"]) for i in range(8)]
        deadline = time.monotonic() + 10
        while handle.stats.remote().result(timeout_s=10)["ongoing"] < 8:
            assert time.monotonic() < deadline, "requests never reached the replica"
            time.sleep(0.05)
        ray_cluster.kill(ray_cluster.get_actor(replica, namespace="serve"))
        start = time.monotonic()
        scores = np.concatenate(client.gather(handles))
        recovery_s = time.monotonic() - start
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert client.retries >= 8  # each request died with the replica and was sent again
    after = handle.stats.remote().result(timeout_s=30)
    assert after["replica"] != replica and after["images"] == 8
    print(
        f"replica restart: every score back {recovery_s:.1f} s after the kill, {client.retries} retries"
    )


@pytest.mark.slow
def test_a_replica_restart_longer_than_the_deadline_is_waited_for(kill_app, ray_cluster, piqe_scorer,
                                                                  distinct_images):
    """SIGKILL (by PID) of the replica while 8 requests wait in it, with a deadline (2 s) far
    shorter than Serve takes to start a new replica: the requests wait for it within
    recovery_timeout_s — no retry of max_retries (0 here) is used — and every score arrives."""
    import os
    import signal

    _cfg, handle = kill_app
    images = distinct_images[:8]
    expected = piqe_scorer.score(images).scores
    before = handle.stats.remote().result(timeout_s=30)
    with RewardClient.from_handle(
        handle, timeout_s=2.0, max_retries=0, backoff_max_s=1.0, recovery_timeout_s=120
    ) as client:
        handles = [client.submit(images[i : i + 1], [f"p{i}"]) for i in range(8)]
        deadline = time.monotonic() + 10
        while handle.stats.remote().result(timeout_s=10)["ongoing"] < 8:
            assert time.monotonic() < deadline, "requests never reached the replica"
            time.sleep(0.05)
        os.kill(before["pid"], signal.SIGKILL)
        start = time.monotonic()
        scores = np.concatenate(client.gather(handles))
        recovery_s = time.monotonic() - start
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert client.unavailable >= 8 and recovery_s > 2.0, (client.unavailable, recovery_s)
    after = handle.stats.remote().result(timeout_s=30)
    assert after["pid"] != before["pid"]
    print(f"replica SIGKILL: every score back {recovery_s:.1f} s after the kill (deadline 2 s), "
          f"{client.unavailable} attempts found it unavailable")


# ------------------------------------------------- ServeTransport: a timeout across a restart
class _Pending:
    """A DeploymentResponse stand-in that never completes (the request waits in Serve's router)."""

    def __init__(self, result=None, delay=None):
        self._result, self._delay = result, delay
        self.cancelled = False

    def __await__(self):
        async def wait():
            if self._delay is None:
                await asyncio.Event().wait()
            await asyncio.sleep(self._delay)
            return self._result
        return wait().__await__()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, make):
        self.make = make

    def remote(self, *args):
        return self.make()


class _Handle:
    def __init__(self, started_at):
        self.score = _Method(lambda: _Pending())
        self.info = _Method(lambda: _Pending({"model": "m", "version": "v", "started_at": str(started_at)}, 0.0))


def test_serve_timeout_is_an_outage_when_the_answering_replica_is_younger_than_the_request():
    """A request that waited in the router through a replica restart (the new replica started after
    it was sent) is an outage, retried within recovery_timeout_s; a timeout on a replica older than
    the request is a plain timeout. Found under load in CI: the controller still reported the
    deployment HEALTHY, so only the replica's age tells the two apart."""
    import time as _time

    from reward_server.client import ServeTransport, _Unavailable

    img = np.zeros((8, 8, 3), np.uint8)
    young = ServeTransport(_Handle(started_at=_time.time() + 0.3))  # starts while the request waits
    young._recovering = lambda: None  # the controller says healthy
    with pytest.raises(_Unavailable, match="started after this request was sent"):
        asyncio.run(young.score([img], ["a"], 0.6))
    old = ServeTransport(_Handle(started_at=_time.time() - 60))
    old._recovering = lambda: None
    with pytest.raises(TimeoutError):
        asyncio.run(old.score([img], ["a"], 0.6))
