"""Wire codec: round trips for every dtype and odd layouts; strict, crash-free decoding."""

import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import wire
from common.types import ImageItem, ScoreRequest, ScoreResponse, Trajectory
from common.wire import Limits, RequestLimits, WireError

NP_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
             "float16", "float32", "float64", "complex64", "complex128"]


# --------------------------------------------------------------------------- round trips
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arr=st.sampled_from(NP_DTYPES).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    )
)
def test_numpy_round_trip_every_dtype_and_shape(arr):
    out = wire.unpackb(wire.packb({"a": arr}))["a"]
    assert out.shape == arr.shape and out.dtype == arr.dtype
    # NaNs compare equal bitwise
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()


@settings(max_examples=40, deadline=None)
@given(
    arr=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6)),
    data=st.data(),
)
def test_non_contiguous_views(arr, data):
    step = data.draw(st.integers(1, 3))
    view = arr[::step].T  # strided + transposed: not C-contiguous
    out = wire.unpackb(wire.packb(view))
    assert out.shape == view.shape
    assert out.tobytes() == np.ascontiguousarray(view).tobytes()


@pytest.mark.parametrize("dt", NP_DTYPES)
def test_zero_d_and_empty(dt):
    for arr in (np.array(1, dtype=dt), np.zeros((0,), dtype=dt), np.zeros((3, 0, 2), dtype=dt)):
        out = wire.unpackb(wire.packb(arr))
        assert out.shape == arr.shape and out.dtype == np.dtype(dt)
        np.testing.assert_array_equal(out, arr)


def test_big_endian_is_converted():
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    out = wire.unpackb(wire.packb(arr))
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.byteorder in ("<", "=")


TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@pytest.mark.parametrize("dt", TORCH_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 4), (2, 3, 5)])
def test_torch_round_trip(dt, shape):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 10).to(dt) if dt not in (torch.complex64,) else torch.randn(shape, dtype=dt)
    out = wire.unpackb(wire.packb([t]))[0]
    assert isinstance(out, torch.Tensor) and out.dtype == dt and out.shape == t.shape
    assert torch.equal(out, t)
    if t.dim() >= 2:  # non-contiguous tensor
        tt = t.transpose(0, 1)
        assert torch.equal(wire.unpackb(wire.packb(tt)), tt)
    if out.numel():  # decoded tensors own writable memory (not a view of the message bytes)
        out.zero_()
        assert not torch.equal(out, t) or not t.any()


def test_numpy_decode_is_a_view_not_a_copy():
    buf = wire.packb(np.arange(1000, dtype=np.float32))
    out = wire.unpackb(buf)
    assert not out.flags.writeable and not out.flags.owndata  # a view of the ext payload


def test_plain_values_round_trip():
    obj = {"a": [1, 2.5, None, True, "x", b"\x00\x01"], "b": {"c": np.float32(1.5), "d": np.int64(7)}}
    out = wire.unpackb(wire.packb(obj))
    assert out == {"a": [1, 2.5, None, True, "x", b"\x00\x01"], "b": {"c": 1.5, "d": 7}}


def test_encode_rejects_unsupported():
    with pytest.raises(WireError) as e:
        wire.packb(np.array(["a", "b"]))
    assert e.value.kind == "dtype"
    with pytest.raises(WireError, match="keys must be str"):
        wire.packb({1: 2})
    with pytest.raises(WireError, match="objects of type type"):
        wire.packb(object)
    with pytest.raises(WireError, match="bfloat16|dtype"):
        wire.packb(np.zeros(3, dtype=[("a", "i4")]))


# ------------------------------------------------------------------------------- strictness
def _ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


def _arr_payload(dtype_code: int, shape, data: bytes, version=1) -> bytes:
    return struct.pack("<BBBB", version, dtype_code, len(shape), 0) + struct.pack(f"<{len(shape)}Q", *shape) + data


@pytest.mark.parametrize(
    "buf, kind, fragment",
    [
        (b"", "malformed", "empty"),
        (b"\xc1", "malformed", "malformed msgpack"),  # 0xc1 is never used in msgpack
        (msgpack.packb([1, 2, 3])[:-1], "malformed", "truncated"),
        (msgpack.packb(1) + b"\x00", "malformed", "malformed msgpack"),  # trailing data
        (_ext(9, b"abc"), "type", "unknown ext type 9"),
        (_ext(1, b"\x01"), "malformed", "shorter than its header"),
        (_ext(1, _arr_payload(99, (2,), b"\0\0")), "dtype", "unknown dtype code 99"),
        (_ext(1, _arr_payload(2, (2, 3), b"\0" * 5)), "shape", "payload carries 5"),
        (_ext(1, _arr_payload(2, (2,), b"\0\0", version=7)), "malformed", "format version"),
        (_ext(1, struct.pack("<BBBB", 1, 2, 9, 0)), "shape", "9 dims"),
        (_ext(1, struct.pack("<BBBB", 1, 2, 2, 0) + b"\0" * 8), "malformed", "truncated"),
        (_ext(1, _arr_payload(15, (1,), b"\0\0")), "dtype", "bfloat16 is only supported for torch"),
        (_ext(1, _arr_payload(2, (2**40, 2**30), b"")), "too_large", "exceeds the cap"),
        (msgpack.packb({1: 2}), "malformed", "keys must be strings"),
        (msgpack.packb(b"\xff\xfe".decode("latin-1")).replace(b"\xc3\xbf", b"\xff\xff"), "malformed", "UTF-8"),
        (msgpack.packb(msgpack.Timestamp(1)), "type", "unknown ext type -1"),
        (b"\xdd\xff\xff\xff\xff", "too_large", "exceeds the cap"),  # array32 claiming 4G elements
        (b"\xdc\x00\x10\x01", "malformed", "truncated"),  # array16 of 16 with 1 byte left
    ],
)
def test_malformed_inputs_raise_wire_error(buf, kind, fragment):
    with pytest.raises(WireError) as err:
        wire.unpackb(buf)
    assert err.value.kind == kind, str(err.value)
    assert fragment in str(err.value)


def test_caps():
    small = Limits(max_message_bytes=100, max_array_bytes=64, max_str_len=10, max_container_len=4, max_depth=3)
    with pytest.raises(WireError, match="exceeds the cap"):
        wire.unpackb(wire.packb(np.zeros(200, np.uint8)), small)
    with pytest.raises(WireError, match="exceeds the cap of 64"):
        wire.unpackb(wire.packb(np.zeros(80, np.uint8)), small)
    with pytest.raises(WireError):
        wire.unpackb(msgpack.packb("x" * 11), small)
    with pytest.raises(WireError):
        wire.unpackb(msgpack.packb([0] * 5), small)
    with pytest.raises(WireError, match="nesting"):
        wire.unpackb(msgpack.packb([[[[[1]]]]]), small)
    deep = b"\x91" * 5000 + b"\x00"  # 5000 nested one-element arrays
    with pytest.raises(WireError):
        wire.unpackb(deep)
    with pytest.raises(WireError, match="expected bytes"):
        wire.unpackb("not bytes")  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_random_bytes_only_ever_raise_wire_error(data):
    try:
        wire.unpackb(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_messages_only_ever_raise_wire_error(data):
    buf = bytearray(wire.packb({"x": np.arange(6, dtype=np.int16).reshape(2, 3), "y": [1.5, "s"]}))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut])):
        try:
            wire.unpackb(candidate)
        except WireError:
            pass
        try:
            wire.decode_score_request(candidate)
        except WireError:
            pass


# ----------------------------------------------------------------------------- typed messages
def _trajectory(B=4, K=3, R=2, H=8) -> Trajectory:
    g = torch.Generator().manual_seed(0)
    return Trajectory(
        input_ids=torch.tensor([0, 0, 1, 1][:B], dtype=torch.int64),
        latents=torch.randn(B, K + 1, 4, 2, 2, generator=g),
        log_probs=torch.randn(B, K, generator=g),
        timesteps=torch.tensor([900, 500, 100][:K], dtype=torch.int64),
        sigmas=torch.rand(K, generator=g),
        reward_steps=torch.tensor([1, 2][:R], dtype=torch.int64),
        reward_images=torch.randint(0, 255, (B, R, H, H, 3), dtype=torch.uint8, generator=g),
        rewards=torch.rand(B, R, generator=g),
        final_images=torch.randint(0, 255, (B, H, H, 3), dtype=torch.uint8, generator=g),
        control_images=torch.randint(0, 255, (B, H, H, 3), dtype=torch.uint8, generator=g),
        policy_version=3,
        eta=1.0,
    ).validate()


def test_trajectory_round_trip():
    t = _trajectory()
    out = wire.decode_trajectory(wire.encode_trajectory(t))
    for name in ("input_ids", "latents", "log_probs", "timesteps", "sigmas", "reward_steps", "reward_images",
                 "rewards", "final_images", "control_images"):
        assert torch.equal(getattr(out, name), getattr(t, name)), name
    assert out.policy_version == 3 and out.eta == 1.0


def test_trajectory_with_wrong_shape_is_rejected():
    body = wire.unpackb(wire.encode_trajectory(_trajectory()))
    body = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in body.items()}
    body["log_probs"] = torch.zeros(4, 5)
    with pytest.raises(WireError) as err:
        wire.decode_trajectory(wire.packb(body))
    assert err.value.kind == "shape" and "log_probs" in str(err.value)
    del body["log_probs"]
    with pytest.raises(WireError, match="missing field"):
        wire.decode_trajectory(wire.packb(body))


def _request(n=3, h=5, w=7) -> ScoreRequest:
    rng = np.random.default_rng(0)
    return ScoreRequest(tuple(ImageItem(f"img-{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for i in range(n)))


def test_score_request_round_trip_is_plain_msgpack():
    req = _request()
    buf = wire.encode_score_request(req)
    plain = msgpack.unpackb(buf)  # any msgpack library reads it: no ext types
    assert plain["images"][0]["shape"] == [5, 7, 3] and plain["images"][0]["dtype"] == "uint8"
    out = wire.decode_score_request(buf)
    assert [i.id for i in out.images] == [i.id for i in req.images]
    for a, b in zip(req.images, out.images):
        np.testing.assert_array_equal(a.pixels, b.pixels)


def _raw_request(**overrides):
    im = {"id": "a", "shape": [2, 2, 3], "dtype": "uint8", "data": bytes(12)}
    im.update(overrides)
    return msgpack.packb({"images": [im]})


@pytest.mark.parametrize(
    "buf, kind, fragment",
    [
        (_raw_request(dtype="float32"), "dtype", "expected 'uint8'"),
        (_raw_request(shape=[2, 2, 4], data=bytes(16)), "shape", "3 channels"),
        (_raw_request(shape=[2, 2]), "shape", "[H, W, 3]"),
        (_raw_request(data=bytes(11)), "shape", "needs 12 bytes, got 11"),
        (_raw_request(id=5), "type", "id: expected a string"),
        (_raw_request(extra=1), "malformed", "unknown field"),
        (msgpack.packb({"images": []}), "shape", "empty"),
        (msgpack.packb({"imgs": []}), "malformed", "missing field"),
        (msgpack.packb([1, 2]), "type", "expected a map"),
    ],
)
def test_bad_score_requests(buf, kind, fragment):
    with pytest.raises(WireError) as err:
        wire.decode_score_request(buf)
    assert err.value.kind == kind and fragment in str(err.value), str(err.value)


def test_score_request_caps():
    buf = wire.encode_score_request(_request(n=5, h=8, w=8))
    with pytest.raises(WireError) as e:
        wire.decode_score_request(buf, RequestLimits(max_images=4))
    assert e.value.kind == "too_many"
    with pytest.raises(WireError) as e:
        wire.decode_score_request(buf, RequestLimits(max_image_pixels=63))
    assert e.value.kind == "too_large"
    with pytest.raises(WireError) as e:
        wire.decode_score_request(buf, RequestLimits(max_request_bytes=100))
    assert e.value.kind == "too_large"


def test_score_response_round_trip():
    r = ScoreResponse(ids=("a", "b"), scores=(0.25, 0.75), levels=((0.1, 0.2, 0.3, 0.2, 0.2),) * 2, model="m",
                      version="1")
    assert wire.decode_score_response(wire.encode_score_response(r)) == r
    with pytest.raises(WireError):
        wire.decode_score_response(msgpack.packb({"ids": ["a"], "scores": ["x"], "levels": None, "model": "m",
                                                  "version": "1"}))


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(_json_like)
def test_reader_matches_reference_msgpack(obj):
    """Our strict reader decodes whatever the reference msgpack writer produces, and packb agrees."""
    ref = msgpack.packb(obj, use_bin_type=True)
    assert wire.unpackb(ref) == msgpack.unpackb(ref, raw=False, strict_map_key=False)
    assert msgpack.unpackb(wire.packb(obj), raw=False, strict_map_key=False) == wire.unpackb(ref)
