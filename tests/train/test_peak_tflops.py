"""MFU's peak FLOP/s comes from the GPU's name; the names are passed in, so this runs on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from smalto.train.metrics import peak_tflops

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_known_gpus_by_name(name, tflops):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peak_tflops(CUDA, name) == tflops


def test_unknown_gpu_warns_once_and_names_the_setting():
    with pytest.warns(UserWarning, match=r"'Imaginary GPU 9000'.*set train\.peak_tflops") as caught:
        assert peak_tflops(CUDA, "Imaginary GPU 9000") is None
        assert peak_tflops(CUDA, "Imaginary GPU 9000") is None
    assert len(caught) == 1


def test_cpu_has_no_peak():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peak_tflops(torch.device("cpu")) is None
