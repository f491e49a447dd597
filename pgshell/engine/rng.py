"""Side jobs (an LR range test, tuning trials) reseed the global generators at every step, as training does; this puts
them back afterwards so the session's own state (what a checkpoint stores) is as if the side job never ran."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng(cuda: bool = True):
    """The global generators (python, numpy, torch's CPU one and, with `cuda`, the GPUs' once initialised) as they
    were on entry, whatever the block draws or reseeds: the one save/restore of them in pgshell."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
