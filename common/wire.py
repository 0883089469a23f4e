"""msgpack wire codec: arrays, tensors and the typed messages of :mod:`common.types`.

Arrays travel as a msgpack *ext type* whose payload is a small fixed header and the raw bytes::

    ext code 1 (numpy.ndarray) | 2 (torch.Tensor), payload:
      u8 format version (=1) | u8 dtype code | u8 ndim | u8 reserved (=0)
      ndim × u64 little-endian dims | raw little-endian C-order data

Encoding writes msgpack headers itself and joins them with the arrays' own buffers, so an array's
bytes are copied exactly once (into the output). Decoding (our own strict reader, not
msgpack's C unpacker, which copies every ext payload) hands numpy a read-only view of the message
buffer: no copy. Torch tensors get one copy, because a torch tensor cannot be read-only.

Decoding is strict: dtype whitelist, ndim ≤ 8, prod(shape) × itemsize must equal the byte length,
size caps on the whole message, strings, bins, arrays and maps, a nesting depth cap, string map
keys only. Anything else raises :class:`WireError` — never pickle, never eval.

The reward API body (DESIGN.md §3) is plain msgpack with explicit fields, so clients in any
language can produce it without our ext type::

    {"images": [{"id": str, "shape": [H, W, 3], "dtype": "uint8", "data": bytes}, ...]}
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np
import torch

from common.types import ImageItem, ScoreRequest, ScoreResponse, ShapeError, Trajectory

__all__ = [
    "WireError",
    "Limits",
    "DEFAULT_LIMITS",
    "packb",
    "unpackb",
    "SUPPORTED_DTYPES",
    "encode_trajectory",
    "decode_trajectory",
    "encode_score_request",
    "decode_score_request",
    "encode_score_response",
    "decode_score_response",
]

EXT_NDARRAY = 1
EXT_TENSOR = 2
_FORMAT_VERSION = 1
_MAX_NDIM = 8
_HEAD = struct.Struct("<BBBB")

# Wire dtype codes. Never reuse a code for another dtype.
_NP_CODES: dict[str, int] = {
    "bool": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "uint32": 6, "int32": 7,
    "uint64": 8, "int64": 9, "float16": 10, "float32": 11, "float64": 12, "complex64": 13, "complex128": 14,
}
_BF16_CODE = 15  # torch.bfloat16: numpy has no bfloat16; carried as uint16 bits.
_CODE_TO_NP = {c: np.dtype(n).newbyteorder("<") for n, c in _NP_CODES.items()}
_TORCH_TO_NP = {
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.uint16: "uint16", torch.int16: "int16",
    torch.uint32: "uint32", torch.int32: "int32", torch.uint64: "uint64", torch.int64: "int64",
    torch.float16: "float16", torch.float32: "float32", torch.float64: "float64",
    torch.complex64: "complex64", torch.complex128: "complex128",
}
#: dtype names accepted on the wire (numpy arrays: all but bfloat16; torch tensors: all).
SUPPORTED_DTYPES: tuple[str, ...] = tuple(_NP_CODES) + ("bfloat16",)


class WireError(ValueError):
    """A message that cannot be decoded (or a value that cannot be encoded).

    ``kind`` classifies it for HTTP status codes and error metrics: ``malformed``, ``dtype``,
    ``shape``, ``too_large``, ``too_many``, ``type``.
    """

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    """Decode caps. Defaults fit a training batch; servers pass tighter ones."""

    max_message_bytes: int = 2**31  # whole message
    max_array_bytes: int = 2**31  # one array / bin payload
    max_str_len: int = 1 << 20
    max_container_len: int = 1 << 20  # elements of one list or map
    max_depth: int = 32


DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------- encode
def _ext_header(code: int, n: int) -> bytes:
    # msgpack ext formats: fixext 1/2/4/8/16, ext 8/16/32 (msgpack spec, "ext format family").
    fix = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fix:
        return struct.pack(">Bb", fix[n], code)
    if n < 1 << 8:
        return struct.pack(">BBb", 0xC7, n, code)
    if n < 1 << 16:
        return struct.pack(">BHb", 0xC8, n, code)
    if n < 1 << 32:
        return struct.pack(">BIb", 0xC9, n, code)
    raise WireError(f"array of {n} bytes exceeds msgpack's 4 GiB ext limit", "too_large")


def _array_chunks(arr: np.ndarray, code: int, dtype_code: int) -> list[Any]:
    if arr.ndim > _MAX_NDIM:
        raise WireError(f"arrays of more than {_MAX_NDIM} dims are not supported (got {arr.ndim})", "shape")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    data = memoryview(arr).cast("B") if arr.size else b""
    head = _HEAD.pack(_FORMAT_VERSION, dtype_code, arr.ndim, 0) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
    return [_ext_header(code, len(head) + arr.nbytes), head, data]


def _numpy_chunks(arr: np.ndarray) -> list[Any]:
    name = arr.dtype.name
    if name not in _NP_CODES or arr.dtype.fields is not None:
        raise WireError(f"numpy dtype {arr.dtype} is not supported (supported: {', '.join(_NP_CODES)})", "dtype")
    return _array_chunks(arr, EXT_NDARRAY, _NP_CODES[name])


def _tensor_chunks(t: torch.Tensor) -> list[Any]:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return _array_chunks(t.contiguous().view(torch.uint16).numpy(), EXT_TENSOR, _BF16_CODE)
    name = _TORCH_TO_NP.get(t.dtype)
    if name is None:
        raise WireError(f"torch dtype {t.dtype} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})", "dtype")
    return _array_chunks(t.contiguous().numpy(), EXT_TENSOR, _NP_CODES[name])


def _encode(obj: Any, out: list[Any], packer: msgpack.Packer, depth: int) -> None:
    if depth > DEFAULT_LIMITS.max_depth:
        raise WireError(f"nesting deeper than {DEFAULT_LIMITS.max_depth}", "too_large")
    if isinstance(obj, np.ndarray):
        out.extend(_numpy_chunks(obj))
    elif isinstance(obj, torch.Tensor):
        out.extend(_tensor_chunks(obj))
    elif isinstance(obj, dict):
        out.append(packer.pack_map_header(len(obj)))
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WireError(f"map keys must be str, got {type(k).__name__}", "type")
            out.append(packer.pack(k))
            _encode(v, out, packer, depth + 1)
    elif isinstance(obj, (list, tuple)):
        out.append(packer.pack_array_header(len(obj)))
        for v in obj:
            _encode(v, out, packer, depth + 1)
    elif isinstance(obj, np.generic):
        _encode(obj.item(), out, packer, depth)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, bytearray, memoryview)):
        try:
            out.append(packer.pack(bytes(obj) if isinstance(obj, memoryview) else obj))
        except (OverflowError, ValueError, TypeError) as err:
            raise WireError(f"cannot encode {type(obj).__name__}: {err}", "type") from None
    else:
        raise WireError(f"cannot encode objects of type {type(obj).__name__}", "type")


def packb(obj: Any) -> bytes:
    """Encode plain data (dict/list/str/int/float/bool/None/bytes) with arrays and tensors."""
    out: list[Any] = []
    _encode(obj, out, msgpack.Packer(autoreset=True, use_bin_type=True), 0)
    return b"".join(out)


# ------------------------------------------------------------------------------------- decode
def _decode_array(code: int, payload: bytes, limits: Limits) -> Any:
    if len(payload) < _HEAD.size:
        raise WireError(f"array payload of {len(payload)} bytes is shorter than its header")
    version, dtype_code, ndim, reserved = _HEAD.unpack_from(payload, 0)
    if version != _FORMAT_VERSION or reserved != 0:
        raise WireError(f"unknown array format version {version}")
    if ndim > _MAX_NDIM:
        raise WireError(f"array with {ndim} dims (max {_MAX_NDIM})", "shape")
    offset = _HEAD.size + 8 * ndim
    if len(payload) < offset:
        raise WireError("array payload truncated inside its shape")
    shape = struct.unpack_from(f"<{ndim}Q", payload, _HEAD.size)
    if dtype_code == _BF16_CODE:
        if code != EXT_TENSOR:
            raise WireError("bfloat16 is only supported for torch tensors", "dtype")
        np_dtype = np.dtype("<u2")
    elif dtype_code in _CODE_TO_NP:
        np_dtype = _CODE_TO_NP[dtype_code]
    else:
        raise WireError(f"unknown dtype code {dtype_code}", "dtype")
    n_items = math.prod(shape)
    nbytes = n_items * np_dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise WireError(f"array of {nbytes} bytes exceeds the cap of {limits.max_array_bytes}", "too_large")
    if len(payload) - offset != nbytes:
        raise WireError(
            f"array shape {list(shape)} × {np_dtype.itemsize} bytes = {nbytes} bytes, "
            f"but the payload carries {len(payload) - offset}",
            "shape",
        )
    arr = np.frombuffer(payload, dtype=np_dtype, count=n_items, offset=offset).reshape(shape)
    if code == EXT_NDARRAY:
        return arr  # read-only view of the payload: no copy
    t = torch.from_numpy(arr.copy())  # torch tensors are always writable: one copy
    return t.view(torch.bfloat16) if dtype_code == _BF16_CODE else t


class _Reader:
    """A strict msgpack reader over a memoryview: ext and (optionally) bin payloads are sliced,
    not copied, so a decoded numpy array is a view of the message buffer.

    Every length is checked against the bytes left and the caps before anything is allocated or
    looped over; nesting is bounded by ``limits.max_depth``.
    """

    def __init__(self, buf: memoryview, limits: Limits, bin_views: bool):
        self.buf, self.pos, self.limits, self.bin_views = buf, 0, limits, bin_views

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise WireError(f"truncated message: needs {n} bytes at offset {self.pos}, {len(self.buf) - self.pos} left")
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _str(self, n: int) -> str:
        if n > self.limits.max_str_len:
            raise WireError(f"string of {n} bytes exceeds the cap of {self.limits.max_str_len}", "too_large")
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError as err:
            raise WireError(f"string is not valid UTF-8: {err}") from None

    def _bin(self, n: int) -> bytes | memoryview:
        if n > self.limits.max_array_bytes:
            raise WireError(f"bin of {n} bytes exceeds the cap of {self.limits.max_array_bytes}", "too_large")
        view = self._take(n)
        return view if self.bin_views else view.tobytes()

    def _ext(self, n: int) -> Any:
        if n > self.limits.max_array_bytes + _HEAD.size + 8 * _MAX_NDIM:
            raise WireError(f"ext of {n} bytes exceeds the cap of {self.limits.max_array_bytes}", "too_large")
        code = int.from_bytes(self._take(1), "big", signed=True)
        payload = self._take(n)
        if code not in (EXT_NDARRAY, EXT_TENSOR):
            raise WireError(f"unknown ext type {code}", "type")
        return _decode_array(code, payload, self.limits)

    def _count(self, n: int, what: str) -> int:
        if n > self.limits.max_container_len:
            raise WireError(f"{what} of {n} elements exceeds the cap of {self.limits.max_container_len}", "too_large")
        if n > len(self.buf) - self.pos:  # every element takes at least one byte
            raise WireError(f"truncated message: {what} of {n} elements at offset {self.pos}")
        return n

    def _array(self, n: int, depth: int) -> list[Any]:
        return [self.read(depth + 1) for _ in range(self._count(n, "array"))]

    def _map(self, n: int, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(self._count(n, "map")):
            key = self.read(depth + 1)
            if not isinstance(key, str):
                raise WireError(f"map keys must be strings, got {type(key).__name__}")
            out[key] = self.read(depth + 1)
        return out

    def read(self, depth: int = 0) -> Any:
        if depth > self.limits.max_depth:
            raise WireError(f"nesting deeper than {self.limits.max_depth}", "too_large")
        b = self._take(1)[0]
        # Format bytes: msgpack spec, "Overview" table.
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b in (0xC4, 0xC5, 0xC6):
            return self._bin(self._uint(1 << (b - 0xC4)))
        if b in (0xC7, 0xC8, 0xC9):
            return self._ext(self._uint(1 << (b - 0xC7)))
        if b == 0xCA:
            return struct.unpack(">f", self._take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self._take(8))[0]
        if 0xCC <= b <= 0xCF:
            return self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            return int.from_bytes(self._take(1 << (b - 0xD0)), "big", signed=True)
        if 0xD4 <= b <= 0xD8:
            return self._ext(1 << (b - 0xD4))
        if 0xD9 <= b <= 0xDB:
            return self._str(self._uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self._array(self._uint(2 if b == 0xDC else 4), depth)
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4), depth)
        raise WireError(f"malformed msgpack: byte 0x{b:02x} at offset {self.pos - 1} is not a format byte")


def unpackb(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS, *, bin_views: bool = False) -> Any:
    """Decode one msgpack message (from :func:`packb` or any msgpack writer). Raises WireError only.

    Arrays come back as read-only numpy views of ``buf`` (torch tensors as copies). With
    ``bin_views`` bins are memoryview slices of ``buf`` instead of bytes copies.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(buf).__name__}", "type")
    view = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
    if len(view) > limits.max_message_bytes:
        raise WireError(f"message of {len(view)} bytes exceeds the cap of {limits.max_message_bytes}", "too_large")
    if len(view) == 0:
        raise WireError("empty message")
    reader = _Reader(view, limits, bin_views)
    obj = reader.read()
    if reader.pos != len(view):
        raise WireError(f"malformed msgpack: {len(view) - reader.pos} bytes of trailing data")
    return obj


# ------------------------------------------------------------------------------ typed messages
def _expect_map(obj: Any, what: str, keys: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a map, got {type(obj).__name__}", "type")
    missing = keys - obj.keys()
    extra = obj.keys() - keys - optional
    if missing:
        raise WireError(f"{what}: missing field(s) {sorted(missing)}")
    if extra:
        raise WireError(f"{what}: unknown field(s) {sorted(extra)}")
    return obj


_TRAJ_TENSORS = (
    "input_ids", "latents", "log_probs", "timesteps", "sigmas", "reward_steps", "reward_images", "rewards",
    "final_images", "control_images",
)


def encode_trajectory(traj: Trajectory) -> bytes:
    body: dict[str, Any] = {"type": "Trajectory", "v": 1}
    for name in _TRAJ_TENSORS:
        body[name] = getattr(traj, name)
    body["policy_version"] = int(traj.policy_version)
    body["eta"] = float(traj.eta)
    return packb(body)


def decode_trajectory(buf: bytes, limits: Limits = DEFAULT_LIMITS) -> Trajectory:
    obj = _expect_map(unpackb(buf, limits), "Trajectory", {"type", "v", "policy_version", "eta", *_TRAJ_TENSORS})
    if obj["type"] != "Trajectory" or obj["v"] != 1:
        raise WireError(f"Trajectory: unexpected type/version {obj['type']!r}/{obj['v']!r}", "type")
    for name in _TRAJ_TENSORS:
        if not isinstance(obj[name], torch.Tensor):
            raise WireError(f"Trajectory.{name}: expected a tensor, got {type(obj[name]).__name__}", "type")
    if not isinstance(obj["policy_version"], int) or isinstance(obj["policy_version"], bool):
        raise WireError("Trajectory.policy_version: expected an int", "type")
    if not isinstance(obj["eta"], float):
        raise WireError("Trajectory.eta: expected a float", "type")
    try:
        return Trajectory(**{k: obj[k] for k in (*_TRAJ_TENSORS, "policy_version", "eta")}).validate()
    except ShapeError as err:
        raise WireError(str(err), "shape") from None


@dataclass(frozen=True)
class RequestLimits:
    """Caps of the reward API (the HTTP server passes the config's values)."""

    max_images: int = 64
    max_image_pixels: int = 2048 * 2048
    max_request_bytes: int = 256 * 2**20


def encode_score_request(req: ScoreRequest) -> bytes:
    images = []
    for item in req.images:
        px = np.ascontiguousarray(item.pixels)
        images.append({"id": item.id, "shape": list(px.shape), "dtype": "uint8", "data": memoryview(px).cast("B")})
    out: list[Any] = []
    packer = msgpack.Packer(autoreset=True, use_bin_type=True)
    # Same single-copy join as packb; the `data` bins are written header + buffer.
    out.append(packer.pack_map_header(1))
    out.append(packer.pack("images"))
    out.append(packer.pack_array_header(len(images)))
    for im in images:
        out.append(packer.pack_map_header(4))
        for key in ("id", "shape", "dtype"):
            out.append(packer.pack(key))
            out.append(packer.pack(im[key]))
        out.append(packer.pack("data"))
        out.append(_bin_header(len(im["data"])))
        out.append(im["data"])
    return b"".join(out)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return struct.pack(">BB", 0xC4, n)
    if n < 1 << 16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def decode_score_request(buf: bytes, limits: RequestLimits = RequestLimits()) -> ScoreRequest:
    """Strictly decode a ``POST /score`` body. ``WireError.kind`` tells the HTTP status."""
    if len(buf) > limits.max_request_bytes:
        raise WireError(f"request of {len(buf)} bytes exceeds the cap of {limits.max_request_bytes}", "too_large")
    wl = Limits(
        max_message_bytes=limits.max_request_bytes,
        max_array_bytes=limits.max_image_pixels * 3,
        max_container_len=max(limits.max_images, 8),
        max_depth=4,
    )
    obj = _expect_map(unpackb(buf, wl, bin_views=True), "request", {"images"})
    images = obj["images"]
    if not isinstance(images, list):
        raise WireError(f"request.images: expected a list, got {type(images).__name__}", "type")
    if len(images) == 0:
        raise WireError("request.images: empty list", "shape")
    if len(images) > limits.max_images:
        raise WireError(f"request.images: {len(images)} images exceed the cap of {limits.max_images}", "too_many")
    items = []
    seen: set[str] = set()
    for i, im in enumerate(images):
        where = f"request.images[{i}]"
        im = _expect_map(im, where, {"id", "shape", "dtype", "data"})
        img_id, shape, dtype, data = im["id"], im["shape"], im["dtype"], im["data"]
        if not isinstance(img_id, str):
            raise WireError(f"{where}.id: expected a string, got {type(img_id).__name__}", "type")
        if img_id in seen:
            raise WireError(f"{where}.id: duplicate id {img_id!r}", "malformed")
        seen.add(img_id)
        if dtype != "uint8":
            raise WireError(f"{where}.dtype: expected 'uint8', got {dtype!r}", "dtype")
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
            raise WireError(f"{where}.shape: expected [H, W, 3] of positive ints, got {shape!r}", "shape")
        if shape[2] != 3:
            raise WireError(f"{where}.shape: expected 3 channels (RGB), got {shape[2]}", "shape")
        if shape[0] * shape[1] > limits.max_image_pixels:
            raise WireError(
                f"{where}: {shape[0]}×{shape[1]} pixels exceed the cap of {limits.max_image_pixels}", "too_large"
            )
        if not isinstance(data, memoryview):
            raise WireError(f"{where}.data: expected bytes, got {type(data).__name__}", "type")
        if len(data) != shape[0] * shape[1] * 3:
            raise WireError(
                f"{where}.data: shape {shape} needs {shape[0] * shape[1] * 3} bytes, got {len(data)}", "shape"
            )
        items.append(ImageItem(img_id, np.frombuffer(data, dtype=np.uint8).reshape(shape)))
    return ScoreRequest(tuple(items))


def encode_score_response(resp: ScoreResponse) -> bytes:
    return packb({f.name: getattr(resp, f.name) for f in fields(resp)})


def decode_score_response(buf: bytes) -> ScoreResponse:
    obj = _expect_map(unpackb(buf), "response", {"ids", "scores", "levels", "model", "version"})
    ids, scores, levels = obj["ids"], obj["scores"], obj["levels"]
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise WireError("response.ids: expected a list of strings", "type")
    if not (isinstance(scores, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise WireError("response.scores: expected a list of numbers", "type")
    if levels is not None and not (
        isinstance(levels, list) and all(isinstance(r, list) and all(isinstance(p, (int, float)) for p in r) for r in levels)
    ):
        raise WireError("response.levels: expected null or a list of lists of numbers", "type")
    if not isinstance(obj["model"], str) or not isinstance(obj["version"], str):
        raise WireError("response.model/version: expected strings", "type")
    try:
        return ScoreResponse(
            ids=tuple(ids),
            scores=tuple(float(s) for s in scores),
            levels=None if levels is None else tuple(tuple(float(p) for p in r) for r in levels),
            model=obj["model"],
            version=obj["version"],
        )
    except ShapeError as err:
        raise WireError(str(err), "shape") from None
