"""RNG states are saved as tensors and numbers: they load with weights_only=True and restore every generator."""

import random

import numpy as np
import torch

from smalto.train.checkpoint import rng_state, set_rng_state


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == expected
