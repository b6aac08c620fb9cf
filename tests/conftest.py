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

        @staticmethod
        def assert_close(out, ref, what: str, tol: float = 1e-4) -> None:
            """max |out - ref| <= tol * max(1, max |ref|), same shapes; the message names ``what``."""
            out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            assert out.shape == ref.shape, (what, out.shape, ref.shape)
            scale = max(1.0, float(np.abs(ref).max()))
            err = float(np.abs(out - ref).max())
            assert err <= tol * scale, f"{what}: max |diff| {err} > {tol} * {scale}"

        @classmethod
        def check_smp_parity(cls, arch: str, encoder: str, in_channels: int, sizes, seed: int = 3, **kw):
            """An SMP ``arch`` model (random weights, distinct norms, eval) against ``create_model``'s with
            the weights moved by ``convert_smp_state_dict``: logits equal at each (height, width) in ``sizes``."""
            import functools

            import jax
            import segmentation_models_pytorch as smp

            from severjax.models import create_model
            from severjax.models.convert import convert_smp_state_dict

            torch.manual_seed(0)
            tm = cls.randomize_norms(
                {"unet": smp.Unet, "fpn": smp.FPN}[arch](encoder, encoder_weights=None, in_channels=in_channels,
                                                         classes=4, **kw).eval())
            model = create_model(arch, encoder, in_channels=in_channels, **kw)
            variables = convert_smp_state_dict(cls.state_dict(tm), model)
            apply = jax.jit(functools.partial(model.apply, train=False))
            rng = np.random.RandomState(seed)
            for height, width in sizes:
                x = rng.randn(1, height, width, in_channels).astype(np.float32)
                with torch.no_grad():
                    ref = cls.nhwc(tm(cls.nchw(x)))
                out = apply(variables, x)
                assert out.shape == (1, height, width, 4)
                cls.assert_close(out, ref, f"{arch}-{encoder} in_channels={in_channels} {kw or ''} logits at "
                                           f"{height}x{width}")
            del apply
            jax.clear_caches()  # the big encoders' executables add up over the matrix

    return Helpers
