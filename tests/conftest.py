"""Shared fixtures: PyTorch reference helpers for the model tests (torch is a test-only dependency)."""

import numpy as np
import pytest


@pytest.fixture
def torch_reference():
    """Helpers for parity tests: ``randomize_norms(module)`` and ``state_dict(module) -> {name: numpy}``.

    Freshly built torch models have identity norms (weight 1, bias 0, mean 0, var 1), which would hide
    mistakes in the BatchNorm/GroupNorm mapping; ``randomize_norms`` gives every norm distinct values.
    """
    torch = pytest.importorskip("torch")

    class Helpers:
        @staticmethod
        def randomize_norms(module, seed: int = 1):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in module.modules():
                    if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                        m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            return module

        @staticmethod
        def state_dict(module):
            return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}

        @staticmethod
        def nchw(x):
            return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))

        @staticmethod
        def nhwc(t):
            return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))

    return Helpers
