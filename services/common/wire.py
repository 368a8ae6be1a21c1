"""Tensors on the wire: shape, dtype and raw little-endian C-order bytes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from styleblend.internal.v1 import tensor_pb2

from services.common.errors import InvalidArgument

_DTYPES: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODES.get(np.dtype(dtype))
    if code is None:
        raise TypeError(f"no wire dtype for {array.dtype}; supported: {sorted(map(str, _CODES))}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return tensor_pb2.Tensor(shape=array.shape, dtype=code, data=data)  # type: ignore[arg-type]


def from_tensor(tensor: tensor_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """Decode a wire tensor, checking its dtype and that its bytes match its shape."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{what}: unknown dtype code {tensor.dtype}")
    shape = tuple(tensor.shape)
    if any(side < 0 for side in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(tensor.data)} bytes for shape {shape} of {dtype.name}, "
            f"expected {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def to_layer_tensors(arrays: Mapping[str, np.ndarray]) -> tensor_pb2.LayerTensors:
    return tensor_pb2.LayerTensors(tensors={name: to_tensor(a) for name, a in arrays.items()})


def from_layer_tensors(message: tensor_pb2.LayerTensors, what: str) -> dict[str, np.ndarray]:
    return {
        name: from_tensor(tensor, f"{what}[{name}]") for name, tensor in message.tensors.items()
    }
