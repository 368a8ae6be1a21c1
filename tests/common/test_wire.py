import numpy as np
import pytest
from styleblend.internal.v1 import tensor_pb2

from services.common import wire
from services.common.errors import InvalidArgument

DTYPES = ["float32", "float16", "float64", "uint8", "int32", "int64", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_values_shape_and_dtype(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    message = tensor_pb2.Tensor.FromString(wire.to_tensor(array).SerializeToString())
    back = wire.from_tensor(message)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_bytes_are_little_endian_c_order() -> None:
    array = np.array([[1, 2], [3, 4]], dtype=">i4").T  # big-endian and Fortran-ordered
    message = wire.to_tensor(array)
    assert message.data == np.array([[1, 3], [2, 4]], dtype="<i4").tobytes()
    np.testing.assert_array_equal(wire.from_tensor(message), array)


def test_scalar_and_empty() -> None:
    np.testing.assert_array_equal(wire.from_tensor(wire.to_tensor(np.array(2.5, np.float32))), 2.5)
    assert wire.from_tensor(wire.to_tensor(np.zeros((0, 3), np.float32))).shape == (0, 3)


def test_wrong_byte_count_names_the_tensor() -> None:
    message = wire.to_tensor(np.zeros((2, 2), np.float32))
    message.data = message.data[:-1]
    with pytest.raises(InvalidArgument, match=r"grams\[relu1_1\]: 15 bytes .* expected 16"):
        wire.from_tensor(message, "grams[relu1_1]")


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown dtype"):
        wire.from_tensor(tensor_pb2.Tensor(shape=[1], data=b"\0"))


def test_layer_tensors_round_trip() -> None:
    arrays = {"relu1_1": np.eye(3, dtype=np.float32), "relu2_1": np.ones((2, 2), np.float32)}
    back = wire.from_layer_tensors(wire.to_layer_tensors(arrays), "grams")
    assert set(back) == set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
