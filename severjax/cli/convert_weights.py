"""Converts a PyTorch (SMP) checkpoint into a severjax exported model.

    severjax-convert-weights --weights fpn_b5.pth --arch fpn --encoder efficientnet-b5 \
        --in_channels 1 --first_conv r --decoder_merge_policy cat --dropout 0.2 --out models/fpn_b5

``--weights`` is a ``.pth``/``.pt`` (loaded with ``torch.load(weights_only=True)``; a bare state dict or one
under ``"state_dict"``/``"model"``/``"model_state_dict"``, with ``module.``/``model.`` prefixes stripped) or a
``.safetensors`` file. ``--encoder_only`` loads an encoder-only state dict (ImageNet weights) and keeps
the decoder at its random initialisation (``--seed``). The result is written with
``severjax.export.save_model`` and loads back with ``severjax.export.load_model``.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from severjax.cli import errors, flags
from severjax.models.convert import FIRST_CONV_MODES
from severjax.models.decoders.fpn import MERGE_POLICIES
from severjax.models.registry import ARCHS

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "model.")


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Runs the conversion; returns the output folder."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import jax
    import jax.numpy as jnp

    from severjax.export import save_model
    from severjax.models import create_model
    from severjax.models.convert import convert_encoder_state_dict, convert_smp_state_dict

    spec: Dict[str, Any] = {"arch": args.arch, "encoder": args.encoder, "classes": args.classes,
                            "in_channels": args.in_channels, "first_conv": args.first_conv}
    for key in ("dropout", "decoder_merge_policy"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.normalize:
        mean, std = args.normalize
        spec["normalize"] = {"mean": mean, "std": std}
    model = create_model(**{k: v for k, v in spec.items() if k != "normalize"})
    state_dict = load_state_dict(args.weights)
    if args.encoder_only:
        x = jnp.zeros((1, 64, 64, args.in_channels), jnp.float32)
        init = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(args.seed))
        variables = convert_encoder_state_dict(state_dict, model, init, first_conv=args.first_conv)
    else:
        variables = convert_smp_state_dict(state_dict, model, first_conv=args.first_conv)
    out = save_model(args.out, variables, spec)
    n = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(variables["params"]))
    print(f"wrote {out}: {args.arch}/{args.encoder}, {n:,} parameters, spec {json.dumps(spec)}")
    return out


def entry() -> int:
    """Console script ``severjax-convert-weights``."""
    return errors.run("convert-weights", main)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads ``path`` (.pth/.pt/.bin via torch, .safetensors) into ``{name: numpy array}``, unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        raw: Mapping[str, Any] = load_file(path)
    else:
        import torch

        raw = torch.load(path, map_location="cpu", weights_only=True)
        for key in WRAPPER_KEYS:
            if isinstance(raw, Mapping) and key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(raw).__name__}")
    out = {}
    for name, value in raw.items():
        if not hasattr(value, "shape"):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[_strip(name)] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if len(out) != len(raw):
        raise ValueError(f"{path}: stripping {STRIP_PREFIXES} prefixes made names collide")
    return out


def _strip(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _parser():
    p = errors.parser("convert-weights", __doc__)
    p.add_argument("--weights", required=True, help=".pth/.pt or .safetensors file")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--encoder", required=True, help="SMP encoder name, e.g. efficientnet-b5, se_resnext50_32x4d")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--in_channels", type=int, default=1)
    p.add_argument("--first_conv", default="sum", choices=FIRST_CONV_MODES,
                   help="how a 3-channel first conv becomes 1-channel (the original solution used r)")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--decoder_merge_policy", choices=MERGE_POLICIES, default=None)
    p.add_argument("--normalize", type=_mean_std, default=None, metavar="MEAN,STD",
                   help="normalisation recorded in the spec, e.g. 0.3439,0.0383")
    p.add_argument("--encoder_only", action="store_true", help="weights are an encoder-only state dict")
    p.add_argument("--seed", type=int, default=0, help="decoder init seed with --encoder_only")
    p.add_argument("--out", required=True, help="output folder (exported model)")
    return p


def _mean_std(text: str) -> tuple[float, float]:
    values = flags.float_list(text)
    if len(values) != 2 or values[1] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'mean,std' with std > 0")
    return values


if __name__ == "__main__":
    raise SystemExit(entry())
