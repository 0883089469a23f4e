"""`make demo`: the main job on the embedded default config (deploy/configs/demo_cpu.yaml).

Runs the end-to-end slice that exists so far; see the README's Status section.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common.config import load_config
from common.types import ImageItem, ScoreRequest
from common.wire import decode_score_request, encode_score_request

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"


def main() -> int:
    cfg = load_config(DEMO_CONFIG, sys.argv[1:])
    print(f"config {DEMO_CONFIG.name}: valid ({cfg.rollout.num_workers} rollout workers, "
          f"K={cfg.rollout.num_inference_steps}, G={cfg.rollout.samples_per_input}, mode={cfg.algorithm.mode})")
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    req = ScoreRequest(tuple(ImageItem(f"photo-{i}", np.ascontiguousarray(p)) for i, p in enumerate(photos)))
    buf = encode_score_request(req)
    back = decode_score_request(buf)
    same = all(np.array_equal(a.pixels, b.pixels) for a, b in zip(req.images, back.images))
    print(f"reward request of {len(photos)} real photos: {len(buf) / 1e6:.2f} MB msgpack, lossless round trip: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
