"""The shared micro-batcher (reward_server/batcher.py) and the one score validator
(common.reward_sink.check_scores). Stub scorers, no model: fast."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from common.reward_sink import RewardError, check_scores
from reward_server.batcher import MicroBatcher, batch_target
from reward_server.factory import ScoredImage
from reward_server.scoring import ScoreBatch


class _SlowMeanScorer:
    """Stub scorer (this file only): mean / 255 per image, ``delay_s`` per call (an engine step)."""

    name, version = "stub:mean", "0"

    def __init__(self, delay_s: float = 0.02):
        self.delay_s = delay_s
        self.calls: list[int] = []

    def score(self, images):
        self.calls.append(len(images))
        time.sleep(self.delay_s)
        return ScoreBatch(scores=np.array([im.mean() / 255 for im in images], dtype=np.float64))


def _img(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


# ------------------------------------------------------------------------------------ the rule
def test_batch_target_rule():
    assert batch_target(16, [], adaptive=True) == 16  # no history: nothing says the load is light
    assert batch_target(16, [1, 1, 1], adaptive=True) == 1  # one client at a time: no wait
    assert batch_target(16, [3, 9, 2], adaptive=True) == 9  # the recent peak
    assert batch_target(16, [40], adaptive=True) == 16  # never beyond a full batch
    assert batch_target(16, [1, 1], adaptive=False) == 16  # @serve.batch's rule
    with pytest.raises(ValueError, match="max_batch_size"):
        batch_target(0, [], adaptive=True)


def test_bad_batcher_settings_are_errors():
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        MicroBatcher(_SlowMeanScorer(), 4, -1.0)
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(_SlowMeanScorer(), 0, 0.1)


# ------------------------------------------------------------------------------------ batching
async def _sequential(batcher: MicroBatcher, n: int) -> list[float]:
    """Concurrency 1: one single-image request at a time; each request's latency."""
    lat = []
    for k in range(n):
        t0 = time.perf_counter()
        (r,) = await batcher.score([f"s{k}"], [_img(10 * k)])
        lat.append(time.perf_counter() - t0)
        assert isinstance(r, ScoredImage) and r.id == f"s{k}" and r.score == pytest.approx(10 * k / 255)
    return lat


async def _lockstep(batcher: MicroBatcher, clients: int, rounds: int) -> list[float]:
    """``clients`` single-image requests at once, the next round when all are answered."""
    elapsed = []
    for r in range(rounds):
        t0 = time.perf_counter()
        out = await asyncio.gather(*(batcher.score([f"{r}-{c}"], [_img(c)]) for c in range(clients)))
        elapsed.append(time.perf_counter() - t0)
        for c, (res,) in enumerate(out):  # every client gets its own image's score
            assert res.id == f"{r}-{c}" and res.score == pytest.approx(c / 255)
    return elapsed


async def _with(batcher: MicroBatcher, work):
    await batcher.start()
    try:
        return await work(batcher)
    finally:
        await batcher.stop()


def test_concurrency_1_does_not_wait_for_company():
    """A wait of 0.5 s: after the first request (no history: it waits), one client sending one
    image at a time is answered without the wait; the fixed rule makes every request wait it."""
    wait = 0.5
    adaptive = MicroBatcher(_SlowMeanScorer(), 16, wait, adaptive=True)
    lat = asyncio.run(_with(adaptive, lambda b: _sequential(b, 5)))
    assert lat[0] >= wait * 0.9
    assert max(lat[1:]) < wait / 2, lat
    assert list(adaptive.batch_sizes) == [1] * 5

    fixed = MicroBatcher(_SlowMeanScorer(), 16, wait, adaptive=False)
    lat = asyncio.run(_with(fixed, lambda b: _sequential(b, 3)))
    assert min(lat) >= wait * 0.9, lat


def test_lockstep_clients_fill_a_batch_and_stop_waiting_once_it_holds_them_all():
    """8 clients in lock step, max 16, wait 1 s: every round is one batch of 8; after the first
    round the batch is cut when the 8th image arrives, not after the wait."""
    scorer = _SlowMeanScorer()
    batcher = MicroBatcher(scorer, 16, 1.0, adaptive=True)
    elapsed = asyncio.run(_with(batcher, lambda b: _lockstep(b, 8, 4)))
    assert list(batcher.batch_sizes) == [8, 8, 8, 8] and scorer.calls == [8, 8, 8, 8]
    assert batcher.waits_run_out == 1  # only the first round waited out the timeout
    assert elapsed[0] >= 0.9  # no history: it waited for a full batch
    assert max(elapsed[1:]) < 0.5, elapsed


def test_a_drop_in_load_costs_one_wait():
    """8 clients in lock step, then one client at a time (wait 0.5 s): the first lone request
    waits for the 8 the memory expects and runs out; the memory is cleared, the next ones do not
    wait (the memory of 8 batches would otherwise make 8 requests wait)."""
    wait = 0.5
    batcher = MicroBatcher(_SlowMeanScorer(), 16, wait, adaptive=True, memory=8)

    async def both(b):
        await _lockstep(b, 8, 2)
        return await _sequential(b, 5)

    lat = asyncio.run(_with(batcher, both))
    assert lat[0] >= wait * 0.9
    assert max(lat[1:]) < wait / 2, lat


def test_zero_wait_takes_what_queued_while_the_scorer_was_busy():
    """batch_wait_timeout_s 0: the first image goes alone, the rest queue behind the busy scorer
    and go together (the old greedy rule)."""
    batcher = MicroBatcher(_SlowMeanScorer(0.05), 16, 0.0)
    asyncio.run(_with(batcher, lambda b: _lockstep(b, 6, 1)))
    assert sum(batcher.batch_sizes) == 6 and max(batcher.batch_sizes) > 1


def test_a_request_larger_than_a_batch_is_split():
    batcher = MicroBatcher(_SlowMeanScorer(0.0), 4, 0.0)

    async def big(b):
        return await b.score([f"i{k}" for k in range(10)], [_img(k) for k in range(10)])

    out = asyncio.run(_with(batcher, big))
    assert [r.id for r in out] == [f"i{k}" for k in range(10)]
    assert max(batcher.batch_sizes) == 4 and sum(batcher.batch_sizes) == 10


# ------------------------------------------------------------------------------------ the validator
def test_check_scores_is_the_one_rule():
    got = check_scores([0.0, 0.5, 1.0, np.nan], 4)
    assert got.dtype == np.float32 and np.isnan(got[3]) and got[1] == 0.5
    assert check_scores([0.25], 1, dtype=np.float64).dtype == np.float64
    with pytest.raises(RewardError, match="returned 2 scores for 3 images"):
        check_scores([0.1, 0.2], 3)
    with pytest.raises(RewardError, match=r"infinite.*positions \[1\]"):
        check_scores([0.1, np.inf], 2)
    with pytest.raises(RewardError, match=r"outside \[0, 1\].*ids \['b'\]: \[1.5\]"):
        check_scores([0.1, 1.5], 2, ids=["a", "b"])
    with pytest.raises(RewardError, match=r"outside \[0, 1\]"):
        check_scores([-0.01], 1)
    with pytest.raises(RewardError, match="NaN"):
        check_scores([np.nan], 1, nan_ok=False)

    class Custom(Exception):
        pass

    with pytest.raises(Custom, match="^my scorer returned"):
        check_scores([2.0], 1, source="my scorer", error=Custom)
