"""Which of timm's registered optimizers can run here (`set optimizer` offers these): a module of its own so the
settings (engine/config.py) can list them without importing the optimizer code that reads the settings."""

from __future__ import annotations

import functools
import importlib.util

import torch

# Packages some of timm's registered optimizers need (fused*: NVIDIA apex; bnb*: bitsandbytes); without them the
# optimizer cannot be built, so it is not offered.
_NEEDS = {"apex.": "apex", "bitsandbytes.": "bitsandbytes"}
# Optimizers pgshell's loop cannot drive: AdaHessian needs `loss.backward(create_graph=True)` (second-order
# gradients), which the loop does not do; its step raises without them.
_UNSUPPORTED = frozenset({"adahessian"})
# Optimizer classes timm builds that are unusable without a package: Kron (kron, kronc, kronw) without opt_einsum
# asked for 110 GB at its first step on test_resnet here (timm only warns that it is "highly recommended").
_CLASS_NEEDS = {"Kron": "opt_einsum"}


@functools.cache
def optimizer_names() -> tuple[str, ...]:
    """The optimizers `set optimizer` accepts: timm's registry (`timm.optim.list_optimizers()`) less those that
    need a package not installed here (apex, bitsandbytes, opt_einsum) or a second-order backward pass."""
    from timm.optim import list_optimizers
    from timm.optim._optim_factory import default_registry

    def usable(name: str) -> bool:
        cls = default_registry.get_optimizer_info(name).opt_class
        if isinstance(cls, str):
            package = next((p for prefix, p in _NEEDS.items() if cls.startswith(prefix)), cls.split(".")[0])
            return importlib.util.find_spec(package) is not None and torch.cuda.is_available()
        needs = _CLASS_NEEDS.get(cls.__name__)
        return name not in _UNSUPPORTED and (needs is None or importlib.util.find_spec(needs) is not None)

    return tuple(n for n in list_optimizers() if usable(n))
