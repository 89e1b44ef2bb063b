"""Padding and batching on the consuming model's device (the CPU here; tests/test_cuda.py
runs every stage through them on a GPU)."""
import torch

from adapterkit.tokens import completion_batch, left_pad, model_device, right_pad, to_device
from helpers import DEVICE


def test_padding_values_and_device():
    seqs = [[5, 6, 7], [8]]
    ids, mask = left_pad(seqs, 0, DEVICE)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad(seqs, 0, DEVICE)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long and ids.device.type == mask.device.type == DEVICE.type
    ids, mask, comp = completion_batch([([1, 2], [3]), ([4], [5, 6, 7])], 0, DEVICE)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert comp.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    assert comp.device.type == DEVICE.type


def test_model_device_and_to_device():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 2)).to(DEVICE)
    assert model_device(model).type == DEVICE.type  # no get_input_embeddings: its first parameter
    batch = {"ids": torch.zeros(2, 3, dtype=torch.long), "pair": (torch.ones(1), torch.ones(1)), "n": 3}
    moved = to_device(batch, model)
    assert moved["ids"].device.type == DEVICE.type and moved["pair"][1].device.type == DEVICE.type
    assert isinstance(moved["pair"], tuple) and moved["n"] == 3
