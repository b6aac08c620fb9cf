"""PyTorch (SMP) state dicts -> Flax variables: a table of name rules plus the few layout changes.

Naming rule (PyTorch state-dict key <-> Flax variable path)
-----------------------------------------------------------
Flax submodules are named after the PyTorch module attributes, so conversion is a table of name rules
(:func:`torch_key_to_flax_path`):

* Split the torch key on ``"."``; glue every all-digit segment onto the segment before it with ``"_"``.
  ``encoder._blocks.3._bn1.weight`` -> module path ``encoder/_blocks_3/_bn1``;
  ``decoder.seg_blocks.0.block.1.block.0.weight`` -> ``decoder/seg_blocks_0/block_1/block_0``;
  ``segmentation_head.0.weight`` -> ``segmentation_head_0``. Models name torch ``nn.Sequential``/``nn.ModuleList``
  children ``f"{attr}_{index}"`` in Flax. Torch names that literally contain ``_<digits>`` (Inception-v4's
  ``branch1_0``) keep their name unchanged: the rule only ever rewrites ``.<digits>``.
* Leaves (:data:`LEAF_RULES`): ``Conv2d`` ``kernel`` <-> ``weight`` (OIHW -> HWIO; a depthwise kernel
  ``(C, 1, kh, kw)`` becomes ``(kh, kw, 1, C)``, the Flax ``feature_group_count`` layout), ``bias`` <-> ``bias``;
  ``nn.Dense`` ``kernel`` <-> ``weight`` transposed; ``BatchNorm2d``/``GroupNorm`` ``scale``/``bias`` <->
  ``weight``/``bias``; ``batch_stats`` ``mean``/``var`` <-> ``running_mean``/``running_var``
  (``num_batches_tracked`` is dropped: Flax keeps no counter and torch uses it only when ``momentum=None``).

The expected Flax tree comes from ``jax.eval_shape(model.init, ...)``; every mismatch is reported at once and
nothing loads partially.

The first convolution may be recycled from 3 input channels to the model's 1 (``first_conv``):
``r``/``g``/``b`` take channel 0/1/2, ``sum`` adds them (SMP's own rule for ``in_channels=1``), ``mean``
averages them.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Path = Tuple[str, ...]

FIRST_CONV_MODES = ("r", "g", "b", "sum", "mean")
DROPPED_LEAVES = ("num_batches_tracked",)
# torch leaf name -> candidate (collection, flax leaf) pairs, first match in the expected tree wins.
LEAF_RULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "weight": (("params", "kernel"), ("params", "scale")),
    "bias": (("params", "bias"),),
    "running_mean": (("batch_stats", "mean"),),
    "running_var": (("batch_stats", "var"),),
}
_TORCH_LEAF = {(c, l): t for t, pairs in LEAF_RULES.items() for c, l in pairs}
_DIGITS = re.compile(r"^\d+$")

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A state dict does not fit the model; the message lists every name at fault."""


def convert_smp_state_dict(state_dict: Mapping[str, Any], model: nn.Module, first_conv: str = "sum") -> Dict[str, Any]:
    """Returns ``{"params", "batch_stats"}`` for ``model`` from an SMP model's ``state_dict()`` (numpy arrays).

    Keys the model's encoder declares unused (``torch_ignored``, e.g. EfficientNet's ``_conv_head``) and
    ``num_batches_tracked`` are dropped (logged). Raises :class:`ConversionError` listing all missing,
    unexpected and wrong-shape names.
    """
    expected = expected_variables(model)
    ignored = tuple(getattr(model, "torch_ignored", ()))
    return _convert(state_dict, expected, ignored, first_conv, getattr(model, "in_channels", None), what="model")


def convert_encoder_state_dict(
    state_dict: Mapping[str, Any], model: nn.Module, variables: Mapping[str, Any], first_conv: str = "sum"
) -> Dict[str, Any]:
    """Replaces the encoder part of ``variables`` with an encoder-only state dict (keys without ``encoder.``).

    This is how ImageNet weights (SMP hub ``model.safetensors``, efficientnet_pytorch or pretrainedmodels
    files) start a training run; the decoder keeps its values from ``variables``. Every encoder variable must
    be given: nothing loads partially.
    """
    expected = expected_variables(model)
    enc_expected = {
        col: {"encoder": tree["encoder"]} for col, tree in expected.items() if isinstance(tree, Mapping) and "encoder" in tree
    }
    if not enc_expected:
        raise ConversionError(f"{type(model).__name__} has no 'encoder' submodule")
    ignored = tuple(getattr(model, "torch_ignored", ()))
    prefixed = {("encoder." + k): v for k, v in state_dict.items()}
    enc = _convert(prefixed, enc_expected, ignored, first_conv, getattr(model, "in_channels", None), what="encoder")
    out = jax.tree_util.tree_map(np.asarray, {k: dict(v) for k, v in variables.items()})
    for col, tree in enc.items():
        out.setdefault(col, {})["encoder"] = tree["encoder"]
    return out


def expected_variables(model: nn.Module, image_size: Tuple[int, int] = (64, 64)) -> Dict[str, Any]:
    """The model's variable tree as ``jax.ShapeDtypeStruct`` leaves (no compute, no memory)."""
    channels = getattr(model, "in_channels", 3)
    x = jax.ShapeDtypeStruct((1, *image_size, channels), jnp.float32)
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype), train=False))
    return {k: v for k, v in tree.items()}


def torch_key_to_flax_path(key: str) -> Tuple[Path, str]:
    """``"encoder._blocks.0._bn1.weight"`` -> ``(("encoder", "_blocks_0", "_bn1"), "weight")``."""
    parts = key.split(".")
    module: List[str] = []
    for part in parts[:-1]:
        if _DIGITS.match(part) and module:
            module[-1] = f"{module[-1]}_{part}"
        else:
            module.append(part)
    return tuple(module), parts[-1]


def flax_path_to_torch_key(collection: str, path: Path) -> str:
    """Best-effort inverse of :func:`torch_key_to_flax_path`, for messages (``_<digits>`` shown as ``.<digits>``)."""
    *module, leaf = path
    name = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in module)
    torch_leaf = _TORCH_LEAF.get((collection, leaf), leaf)
    return f"{name}.{torch_leaf}" if name else torch_leaf


def recycle_first_conv(weight: np.ndarray, mode: str) -> np.ndarray:
    """3-channel OIHW conv weight -> 1-channel: channel r/g/b, their sum (SMP's rule) or their mean."""
    if mode not in FIRST_CONV_MODES:
        raise ValueError(f"first_conv must be one of {FIRST_CONV_MODES}, got {mode!r}")
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"first-conv recycling needs an OIHW weight with 3 input channels, got shape {weight.shape}")
    if mode in ("r", "g", "b"):
        i = "rgb".index(mode)
        return weight[:, i : i + 1]
    if mode == "sum":
        return weight.sum(axis=1, keepdims=True)
    return weight.mean(axis=1, keepdims=True)


def to_flax_layout(value: np.ndarray, flax_leaf: str, flax_shape: Tuple[int, ...]) -> np.ndarray:
    """Torch layout -> Flax layout for one leaf (conv OIHW -> HWIO, dense (out, in) -> (in, out))."""
    if flax_leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if flax_leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


# ----------------------------------------------------------------------------------------------------
# helpers


def _convert(state_dict, expected, ignored, first_conv, in_channels, what):
    if first_conv not in FIRST_CONV_MODES:
        raise ValueError(f"first_conv must be one of {FIRST_CONV_MODES}, got {first_conv!r}")
    flat_expected = _flatten(expected)  # (collection, *path) -> ShapeDtypeStruct
    by_module: Dict[Path, Dict[Tuple[str, str], Any]] = {}
    for (col, *path), leaf in flat_expected.items():
        by_module.setdefault(tuple(path[:-1]), {})[(col, path[-1])] = leaf

    assigned: Dict[Tuple[str, ...], np.ndarray] = {}
    sources: Dict[Tuple[str, ...], str] = {}
    unexpected, wrong_shape, collisions, dropped = [], [], [], []
    recycled: List[str] = []
    for key in sorted(state_dict):
        value = np.asarray(state_dict[key])
        if any(key.startswith(p) for p in ignored):
            dropped.append(key)
            continue
        module, leaf = torch_key_to_flax_path(key)
        if leaf in DROPPED_LEAVES:
            dropped.append(key)
            continue
        slots = by_module.get(module, {})
        target = next(((c, l) for c, l in LEAF_RULES.get(leaf, ()) if (c, l) in slots), None)
        if target is None:
            unexpected.append(key)
            continue
        full = (target[0], *module, target[1])
        if full in sources:
            collisions.append(f"{key} and {sources[full]} both map to {'/'.join(full)}")
            continue
        want = tuple(slots[target].shape)
        if (in_channels == 1 and target[1] == "kernel" and value.ndim == 4 and len(want) == 4
                and value.shape[1] == 3 and want[2] == 1 and (value.shape[0], *value.shape[2:]) == (want[3], *want[:2])):
            value = recycle_first_conv(value, first_conv)
            recycled.append(key)
        converted = to_flax_layout(value, target[1], want)
        if tuple(converted.shape) != want:
            sources[full] = key
            wrong_shape.append(f"{key}: torch {tuple(value.shape)} -> flax {tuple(converted.shape)}, model wants {want}")
            continue
        assigned[full] = converted.astype(slots[target].dtype)
        sources[full] = key

    missing = [f"{flax_path_to_torch_key(c, tuple(p))} (flax {'/'.join((c, *p))})"
               for (c, *p) in flat_expected if (c, *p) not in sources]
    if len(recycled) > 1:
        collisions.append(f"more than one convolution recycled from 3 to 1 input channels: {recycled}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                         ("ambiguous", collisions)):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise ConversionError(f"state dict does not fit the {what} ({len(state_dict)} keys):\n" + "\n".join(problems))
    if dropped:
        log.info("dropped %d torch keys the model does not use: %s", len(dropped), _summary(dropped))
    if recycled:
        log.info("first conv %s recycled from 3 channels to 1 with mode %r", recycled[0], first_conv)
    return _unflatten(assigned)


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    out.setdefault("params", {})
    out.setdefault("batch_stats", {})
    return out


def _summary(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    head = ", ".join(keys[:limit])
    return head + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
