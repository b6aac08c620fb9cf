"""Training configuration: every default (the schema), loading a run's config file, validation.

A run's config file (``configs/*.py`` or the user's own) builds on the defaults and sets only the values
that differ::

    from severjax import config as defaults

    def get_config():
        config = defaults.get_config()
        config.model.encoder = "efficientnet-b0"
        return config

``python -m severjax.train --config=path.py[:arg]`` loads it (:func:`load`), applies the
``--config.key=value`` overrides (:func:`check_overrides` rejects keys the config does not define) and
checks it (:func:`validate`) before anything compiles. Every key must be defined by :func:`get_config`.
"""

from __future__ import annotations

import inspect
import os
import runpy
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np

from severjax.export import DEFAULT_NORMALIZE

# config.model.dtype -> the compute dtype (parameters stay float32)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KAGGLE_HINT = (
    "download the Kaggle data with `kaggle competitions download -c severstal-steel-defect-detection`, "
    "unzip it so that the folder holds train.csv and train_images/ (and test_images/), and pass "
    "--config.data.dir=<that folder> (or try configs/quickstart.py, which trains on synthetic data)"
)


def get_config() -> ml_collections.ConfigDict:
    """The defaults shared by every run (the original solution's values where it had one)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 18  # GLOBAL batch over all devices and hosts
    config.eval_batch_size = 8  # global, full 256x1600 images
    config.epochs = 250
    config.steps_per_epoch = 0  # 0 = n_train // batch_size
    config.eval_every_epochs = 1
    # stop after this many epochs without a better validation score (the original meant 50/100; its
    # monitoring was broken so it never stopped); 0 = never
    config.early_stop_epochs = 0
    config.checkpoint_every = 500  # steps between periodic train-state saves (epoch ends always save)
    config.keep_checkpoints = 2  # latest K periodic checkpoints, plus the best by validation score
    config.log_every = 20  # steps between TensorBoard scalars
    # optimizer steps run by one device call (unrolled into one XLA program; calls never straddle an epoch
    # end or a checkpoint). 0 = the backend's choice, severjax.ops.policy.steps_per_call: 1, except 3 on a
    # CPU whose malloc gets no huge pages. More steps a call compile longer and need more memory
    # (docs/performance.md, "Steps a call").
    config.steps_per_call = 0
    config.progress_bar = True
    config.init_weights = ""  # "" or an exported model folder / training workdir (severjax-convert-weights)
    # Before each evaluation, replace the BatchNorm running statistics by their exact mean over this
    # many training batches ("precise BN"); 0 = keep the running averages (the original's behaviour).
    config.bn_recalibration_batches = 0

    config.data = ml_collections.ConfigDict()
    config.data.dir = "./data/severstal"  # Kaggle layout: train.csv, train_images/ [, test_images/]
    config.data.tfds_dir = ""  # "" = <data.dir>/tfds
    config.data.synthetic = None  # or ConfigDict(n_train, n_test, seed): generate into data.dir if empty
    config.data.crop = (256, 416)
    config.data.image_shape = (256, 1600)
    config.data.val_fraction = 0.2
    config.data.split_seed = 0
    config.data.mean = DEFAULT_NORMALIZE["mean"]
    config.data.std = DEFAULT_NORMALIZE["std"]  # the original's value (really the variance; the true std is ~0.196)
    config.data.workers = 0  # grain worker processes (0 = in-process)
    config.data.limit_train = 0  # 0 = all
    config.data.limit_val = 0
    config.data.pseudo_csv = ""
    config.data.pseudo_images = ""
    config.data.pseudo_alpha = -0.15

    config.aug = ml_collections.ConfigDict()
    config.aug.crop_nonempty_p = 0.5
    config.aug.clahe_clip = (1.0, 4.0)
    config.aug.blur = 3
    config.aug.sharpen_alpha = (0.2, 0.3)
    config.aug.oneof = (0.5, 0.3, 0.3)  # CLAHE, blur, sharpen
    config.aug.hflip = 0.5
    config.aug.vflip = 0.5

    config.model = ml_collections.ConfigDict()
    config.model.arch = "fpn"
    config.model.encoder = "efficientnet-b5"
    config.model.classes = 4
    config.model.in_channels = 1
    config.model.dropout = 0.2
    config.model.decoder_merge_policy = "cat"
    config.model.first_conv = "r"
    config.model.dtype = "float32"  # compute dtype: one of DTYPES (params stay float32)

    config.loss = ml_collections.ConfigDict()
    config.loss.bce_weight = 0.6
    config.loss.dice_weight = 0.4
    config.loss.dice_eps = 1e-7

    config.optim = ml_collections.ConfigDict()
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.threshold = 5.0  # RAdam rectification when N_sma >= threshold
    config.optim.encoder_lr = 7e-5
    config.optim.encoder_wd = 3e-5
    config.optim.decoder_lr = 3e-3
    config.optim.decoder_wd = 3e-4
    config.optim.clip_norm = 0.0  # global-norm clipping, 0 = off
    config.optim.schedule = "flat_logistic"  # or "flat_cosine", "constant"
    config.optim.flat_epochs = 30
    return config


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``"path.py[:arg]"``: the file's ``get_config(arg)`` (``get_config()`` without ``:arg``).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, defines no
    ``get_config``, takes no argument but is given one, or returns something other than a ConfigDict.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {spec!r}: no such file {path!r}")
    get = runpy.run_path(path, run_name="severjax_user_config").get("get_config")
    if not callable(get):
        raise ValueError(f"config {path!r} defines no get_config()")
    if arg and not inspect.signature(get).parameters:
        raise ValueError(f"config {path!r}: get_config() takes no argument, got {arg!r}")
    config = get(arg) if arg else get()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config {path!r}: get_config() returned a {type(config).__name__}, not a ConfigDict")
    return config


def check_overrides(argv: list[str]) -> None:
    """Loads ``--config=`` of a command line and rejects ``--config.<key>`` overrides of keys it does not
    define, raising ``ValueError`` naming the key (ml_collections' flag parser would fail on them with a bare
    ``AttributeError``). Raises like :func:`load` for a bad config file; does nothing without ``--config``."""
    spec = _flag_value(argv, "--config")
    if spec is None:
        return
    config = load(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        name = arg[2:].split("=", 1)[0]
        node: Any = config
        for part in name.split(".")[1:]:
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                raise ValueError(f"--{name}: unknown config key {name!r} (defined neither by "
                                 f"{spec.partition(':')[0]} nor by severjax.config.get_config())")
            node = node[part]


def validate(config: ml_collections.ConfigDict, *, device_count: int | None = None,
             check_data: bool = True) -> None:
    """Raises ``ValueError`` / ``FileNotFoundError`` naming the key and value at fault.

    Runs before anything compiles: keys :func:`get_config` does not define, crops bigger than the image or
    not multiples of 32, global batches not divisible by the device count (default: ``jax.device_count()``),
    unknown architectures, dtypes and schedules, a missing ``init_weights`` model and, with ``check_data``,
    a data folder without the Kaggle files.
    """
    import jax

    from severjax import optim
    from severjax.export import resolve_model_dir
    from severjax.models.registry import ARCHS

    device_count = jax.device_count() if device_count is None else device_count
    unknown = unknown_keys(config)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}: every key must be defined by "
                         "severjax.config.get_config()")
    h_img, w_img = (int(v) for v in config.data.image_shape)
    crop = tuple(config.data.crop)
    if len(crop) != 2 or not all(isinstance(v, (int, np.integer)) for v in crop):
        raise ValueError(f"config.data.crop={crop!r}: expected (height, width) integers")
    if not (0 < crop[0] <= h_img and 0 < crop[1] <= w_img):
        raise ValueError(f"config.data.crop={crop}: must fit inside the {h_img}x{w_img} images")
    if crop[0] % 32 or crop[1] % 32:
        raise ValueError(f"config.data.crop={crop}: both sides must be multiples of 32 (the encoder stride)")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] <= 0 or config[key] % device_count:
            raise ValueError(f"config.{key}={config[key]}: the global batch must be a positive multiple "
                             f"of the device count ({device_count} over {jax.process_count()} process(es))")
    for key in ("epochs", "eval_every_epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
        if config[key] <= 0:
            raise ValueError(f"config.{key}={config[key]}: must be positive")
    for key in ("steps_per_epoch", "early_stop_epochs", "bn_recalibration_batches", "steps_per_call"):
        if config[key] < 0:
            raise ValueError(f"config.{key}={config[key]}: must be >= 0")
    if config.model.arch not in ARCHS:
        raise ValueError(f"config.model.arch={config.model.arch!r}: the trainer trains one of {ARCHS}")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={config.model.dtype!r}: expected one of {tuple(DTYPES)}")
    if config.optim.schedule not in optim.SCHEDULES:
        raise ValueError(f"config.optim.schedule={config.optim.schedule!r}: expected one of "
                         f"{optim.SCHEDULES}")
    if not 0 <= config.optim.flat_epochs <= config.epochs:
        raise ValueError(f"config.optim.flat_epochs={config.optim.flat_epochs}: must lie in "
                         f"[0, config.epochs={config.epochs}]")
    if config.data.std <= 0:
        raise ValueError(f"config.data.std={config.data.std}: must be positive")
    if config.loss.bce_weight < 0 or config.loss.dice_weight < 0:
        raise ValueError(f"config.loss: bce_weight={config.loss.bce_weight} and dice_weight="
                         f"{config.loss.dice_weight} must be >= 0")
    if config.model.arch == "classifier" and (config.loss.dice_weight != 0 or config.loss.bce_weight <= 0):
        raise ValueError(f"config.loss.dice_weight={config.loss.dice_weight}, bce_weight={config.loss.bce_weight}: "
                         "the classifier's loss is bce_weight * BCE over image labels (there is no mask to "
                         "Dice); set dice_weight=0 and bce_weight > 0")
    if config.init_weights:
        try:
            resolve_model_dir(config.init_weights)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"config.init_weights={config.init_weights!r}: {err}") from None
    if check_data:
        _check_data_dir(config)


def unknown_keys(config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                 prefix: str = "config") -> list[str]:
    """Dotted names of the keys of ``config`` that ``defaults`` (default :func:`get_config`) does not define."""
    defaults = get_config() if defaults is None else defaults
    unknown = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if key not in defaults:
            unknown.append(name)
        elif isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(
                defaults[key], (ml_collections.ConfigDict, dict)):
            unknown += unknown_keys(value, defaults[key], name)
    return unknown


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as ``config.json`` (and ``config.yaml``) in ``workdir``."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, "config.yaml"), "w") as f:
        f.write(config.to_yaml())


def _check_data_dir(config: ml_collections.ConfigDict) -> None:
    """The Kaggle folder must hold train.csv and train_images/, unless a synthetic set is configured."""
    data_dir = os.path.abspath(os.path.expanduser(config.data.dir))
    if config.data.synthetic is not None:
        return  # generated there on first use by the input pipeline
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config.data.dir={config.data.dir!r}: folder {data_dir} does not exist; "
                                + KAGGLE_HINT)
    missing = [n for n in ("train.csv", "train_images") if not os.path.exists(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(f"config.data.dir={config.data.dir!r}: {data_dir} lacks {' and '.join(missing)}; "
                                + KAGGLE_HINT)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag=value`` or ``--flag value``); None if absent."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None
