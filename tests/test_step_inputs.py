"""Host arrays of a step and their way to the device: one packed copy for several arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.engine.inputs import padded_block_tables, rows_among, to_device_packed


def arrays() -> list[np.ndarray]:
    # Odd byte sizes next to wider dtypes (alignment), an empty array, a 2-D table, a float row.
    return [
        np.array([7, -1, 2**40], dtype=np.int64),
        np.array([1, 2, 3], dtype=np.int32),
        np.zeros(0, dtype=np.int64),
        np.array([[4, -1], [5, 6]], dtype=np.int32),
        np.array([0.25, -3.5], dtype=np.float32),
        np.array([9], dtype=np.int64),
    ]


def check(tensors: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    assert len(tensors) == len(expected)
    for tensor, array in zip(tensors, expected):
        assert tensor.dtype == torch.from_numpy(array).dtype and tuple(tensor.shape) == array.shape
        assert tensor.cpu().tolist() == array.tolist()


def test_packed_arrays_keep_values_dtypes_and_shapes():
    expected = arrays()
    tensors = to_device_packed(expected, torch.device("cpu"))
    check(tensors, expected)
    # Triton compiles a variant per pointer alignment: an unaligned view would compile new ones mid-run.
    assert all(t.data_ptr() % 16 == 0 for t in tensors if t.numel())
    tensors[1][1] = 99  # one array's view is its own: writing it leaves the others as they were
    check([tensors[0], tensors[2], tensors[3]], [expected[0], expected[2], expected[3]])
    assert to_device_packed([], torch.device("cpu")) == []
    only_empty = [np.zeros(0, dtype=np.int64), np.array([[3]], dtype=np.int32), np.zeros((0, 4), dtype=np.int32)]
    check(to_device_packed(only_empty, torch.device("cpu")), only_empty)


@pytest.mark.cuda
def test_packed_arrays_on_the_gpu():
    expected = arrays()
    tensors = to_device_packed(expected, torch.device("cuda"))
    assert all(t.is_cuda for t in tensors)
    torch.cuda.synchronize()
    check(tensors, expected)
    assert all(t.data_ptr() % 16 == 0 for t in tensors if t.numel())


def test_block_tables_padded_to_the_longest():
    assert padded_block_tables([[3], [4, 5, 6], []]).tolist() == [[3, -1, -1], [4, 5, 6], [-1, -1, -1]]
    assert padded_block_tables([[1, 2], [3, 4]]).dtype == np.int32


def test_rows_among_the_previous_step():
    assert rows_among([4, 7, 9], [4, 7, 9]).tolist() == [0, 1, 2]
    assert rows_among([4, 7], [4, 7, 9]).tolist() == [0, 1], "the last rows finished"
    assert rows_among([7, 9], [4, 7, 9]).tolist() == [1, 2], "the first row finished"
    assert rows_among([9, 4], [4, 7, 9]).tolist() == [2, 0]
    assert rows_among([], [4]).tolist() == [] and rows_among([], []).dtype == np.int64
