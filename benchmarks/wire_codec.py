"""Wire codec throughput: encode+decode of 64 × 512×512×3 uint8 images vs a plain memory copy.

    python -m benchmarks.wire_codec [--images 64] [--side 512] [--rounds 7]

Headline: ``ratio_to_memcpy`` = memcpy time / (encode+decode time) for the same bytes, measured
interleaved in one run (target ≥ 0.5). Two paths are measured: the generic ext-type codec
(``packb``/``unpackb`` of a list of arrays) and the reward API body (``encode_score_request``/
``decode_score_request``, plain msgpack bins).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks._common import emit, interleaved, print_table
from common import wire
from common.types import ImageItem, ScoreRequest
from common.wire import RequestLimits


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8) for _ in range(args.images)]
    nbytes = sum(im.nbytes for im in images)
    request = ScoreRequest(tuple(ImageItem(f"{i}", im) for i, im in enumerate(images)))
    limits = RequestLimits(max_images=args.images, max_image_pixels=args.side**2, max_request_bytes=2 * nbytes)
    flat = np.concatenate([im.ravel() for im in images])

    def memcpy():
        # A plain copy of the same bytes into a fresh buffer (what any serializer must do once).
        return bytes(memoryview(flat))

    def generic():
        out = wire.unpackb(wire.packb(images))
        assert len(out) == args.images and out[-1].shape == images[-1].shape

    def score_request():
        out = wire.decode_score_request(wire.encode_score_request(request), limits)
        assert len(out.images) == args.images

    # correctness first: the round trip is lossless
    back = wire.unpackb(wire.packb(images))
    assert all(np.array_equal(a, b) for a, b in zip(images, back))

    t = interleaved({"memcpy": memcpy, "generic": generic, "score_request": score_request}, rounds=args.rounds)
    gbps = {k: nbytes / v["min_s"] / 1e9 for k, v in t.items()}
    ratio = {k: t["memcpy"]["min_s"] / t[k]["min_s"] for k in ("generic", "score_request")}
    print_table(
        f"wire codec: {args.images} × {args.side}×{args.side}×3 uint8 = {nbytes / 1e6:.1f} MB (best of {args.rounds})",
        [(k, f"{v['min_s'] * 1e3:.1f}", f"{gbps[k]:.2f}", f"{ratio.get(k, 1.0):.2f}") for k, v in t.items()],
        ("path", "ms", "GB/s", "ratio_to_memcpy"),
    )
    figures = {
        "ratio_to_memcpy": round(ratio["generic"], 3),
        "score_request_ratio_to_memcpy": round(ratio["score_request"], 3),
        "encode_decode_gb_per_s": round(gbps["generic"], 3),
        "memcpy_gb_per_s": round(gbps["memcpy"], 3),
        "bytes": nbytes,
        "target_ratio": 0.5,
    }
    emit("wire_codec", figures)
    return figures


if __name__ == "__main__":
    main()
