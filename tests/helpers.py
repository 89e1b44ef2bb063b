"""What tests share besides fixtures: the device the suite runs on, and tolerances by device.

A comparison of two code paths keeps its CPU tolerance exactly (often 0: bit for bit); on a
GPU the same comparison runs in bf16 with other kernels, so it gets a tolerance that holds
there, on the mean difference (``gap``). Every CUDA tolerance is named at the assertion that uses it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the stages put models
ON_CUDA = DEVICE.type == "cuda"
ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict:
    """The environment for a child ``python -m adapterkit``: this checkout first on PYTHONPATH,
    then whatever PYTHONPATH the suite runs under (packages installed by path stay importable)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def tol(cpu: float, cuda: float) -> float:
    """The tolerance for this device: ``cpu`` on CPU (unchanged from the CPU-only suite),
    ``cuda`` on a GPU (bf16 compute)."""
    return cuda if ON_CUDA else cpu


def gap(max_diff: float, mean_diff: float) -> float:
    """The difference a comparison of two code paths is held to on this device: the largest
    elementwise one on CPU, the mean on a GPU. Two bf16 computations of the same logits differ
    with a heavy tail: on the tiny SFT+DPO stack, bf16 against fp32 (on CPU) differ by 0.011 on
    average but up to 0.76 (logits up to 12, where one bf16 step is 0.06), so a largest-difference
    test on a GPU tests rounding; the mean still shows a missing or wrong adapter (the DPO
    adapter alone moves those logits by 0.52 on average)."""
    return mean_diff if ON_CUDA else max_diff


def assert_close(actual, expected, cpu: float, cuda: float) -> None:
    """On CPU |actual - expected| <= cpu elementwise (0: equal bit for bit); on a GPU the mean
    |actual - expected| <= cuda (see ``gap``)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    expected = expected.to(actual.device, actual.dtype)
    if not ON_CUDA:
        torch.testing.assert_close(actual, expected, atol=cpu, rtol=0)
        return
    diff = (actual.float() - expected.float()).abs()
    assert diff.mean().item() <= cuda, f"mean difference {diff.mean().item():.4g} > {cuda} (largest {diff.max().item():.4g})"


def load_nf4(auto, path, prepared: bool = False, **kwargs):
    """A base loaded the plain transformers way (``auto``: AutoModelFor...), 4-bit NF4 with
    double quantization computing in the dtype adapterkit resolves for this device, on it.

    Its other weights (embeddings, norms, heads) are in that dtype too, as ``load_model``
    leaves them; ``prepared``: in fp32, as peft's ``prepare_model_for_kbit_training`` leaves
    them in a model the SFT, reward and DPO stages train. (On CPU both are fp32.)"""
    from transformers import BitsAndBytesConfig
    from adapterkit.quant import keep_compute_dtype, resolve_dtype
    dtype = resolve_dtype("auto", DEVICE)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = auto.from_pretrained(str(path), quantization_config=nf4, dtype=torch.float32 if prepared else dtype,
                                 device_map={"": DEVICE}, **kwargs)
    keep_compute_dtype(model)  # bnb's CPU bf16 eval kernel off, as adapterkit loads bases
    return model


def event_tags(folder) -> set[str]:
    """The scalar tags in every TensorBoard event file under ``folder``."""
    from pathlib import Path
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in Path(folder).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags
