"""severjax.config: loading config files, overrides, validation, and the trainer's command-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from severjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("b5_fpn", "b5_unet", "sx50_fpn", "sx50_unet", "cls_b1", "cls_b0_quick", "quickstart")


def _defaults():
    """The defaults; the data folder points nowhere (nothing here reads data)."""
    config = config_lib.get_config()
    config.data.dir = os.path.join(ROOT, "does-not-exist")
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_loads_and_validates(name):
    config = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))
    assert config_lib.unknown_keys(config) == []
    if config.data.synthetic is None:
        config.data.synthetic = {"n_train": 8, "n_test": 0, "seed": 0}  # no Kaggle folder here
    config_lib.validate(config, device_count=1)


def test_load_names_the_file_at_fault(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        config_lib.load(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"empty.py' defines no get_config"):
        config_lib.load(str(tmp_path / "empty.py"))
    (tmp_path / "plain.py").write_text("from severjax import config as defaults\n\n"
                                       "def get_config():\n    return defaults.get_config()\n")
    with pytest.raises(ValueError, match="takes no argument, got 'b0'"):
        config_lib.load(f"{tmp_path / 'plain.py'}:b0")
    (tmp_path / "variant.py").write_text(
        "from severjax import config as defaults\n\n"
        "def get_config(encoder='efficientnet-b5'):\n"
        "    config = defaults.get_config()\n    config.model.encoder = encoder\n    return config\n")
    assert config_lib.load(str(tmp_path / "variant.py")).model.encoder == "efficientnet-b5"
    assert config_lib.load(f"{tmp_path / 'variant.py'}:efficientnet-b0").model.encoder == "efficientnet-b0"


def test_overrides_of_undefined_keys_are_rejected_by_name():
    quickstart = os.path.join(ROOT, "configs", "quickstart.py")
    config_lib.check_overrides([f"--config={quickstart}", "--workdir=w", "--config.optim.encoder_lr=1"])
    config_lib.check_overrides(["--config", quickstart, "--config.data.crop", "(64, 64)"])
    with pytest.raises(ValueError, match="unknown config key 'config.optim.lr'"):
        config_lib.check_overrides([f"--config={quickstart}", "--config.optim.lr=1"])
    with pytest.raises(ValueError, match="unknown config key 'config.seed.x'"):
        config_lib.check_overrides([f"--config={quickstart}", "--config.seed.x=1"])
    config_lib.check_overrides(["--workdir=w"])  # no config: nothing to check


def test_save_writes_the_resolved_config(tmp_path):
    config_lib.save(config_lib.get_config(), str(tmp_path))
    assert '"encoder": "efficientnet-b5"' in (tmp_path / "config.json").read_text()
    assert (tmp_path / "config.yaml").is_file()


def test_bad_configs_fail_before_compiling_with_clear_messages(tmp_path):
    validate_config = config_lib.validate
    config = _defaults()
    with pytest.raises(FileNotFoundError, match="kaggle competitions download -c severstal-steel-defect-detection"):
        validate_config(config, device_count=1)
    config.data.synthetic = {"n_train": 8, "n_test": 0, "seed": 0}
    validate_config(config, device_count=1)  # a synthetic set is generated on first use
    config.data.crop = (256, 1632)
    with pytest.raises(ValueError, match=r"config.data.crop=\(256, 1632\): must fit inside the 256x1600"):
        validate_config(config, device_count=1)
    config.data.crop = (256, 400)
    with pytest.raises(ValueError, match="multiples of 32"):
        validate_config(config, device_count=1)
    config.data.crop = (256, 416)
    with pytest.raises(ValueError, match=r"config.batch_size=18: .* multiple of the device count \(8"):
        validate_config(config, device_count=8)
    config.batch_size = 16
    validate_config(config, device_count=8)
    config.data.crop_size = (1, 2)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) config.data.crop_size"):
        validate_config(config, device_count=1)
    del config.data["crop_size"]
    config.init_weights = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.init_weights=.*nowhere"):
        validate_config(config, device_count=1)
    config.init_weights = ""
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="config.model.dtype='float16'"):
        validate_config(config, device_count=1)
    config.model.dtype = "float32"
    config.steps_per_call = -1
    with pytest.raises(ValueError, match=r"config.steps_per_call=-1: must be >= 0"):
        validate_config(config, device_count=1)
    config.steps_per_call = 0
    config.model.arch = "classifier"  # keeps the segmentation loss weights 0.6 / 0.4: refused
    with pytest.raises(ValueError, match=r"config.loss.dice_weight=0.4.*classifier's loss is bce_weight \* BCE"):
        validate_config(config, device_count=1)
    config.loss.dice_weight = 0.0
    validate_config(config, device_count=1)


# ------------------------------------------------------------------------------ the command line


def _train(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "severjax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_rejects_unknown_override_and_missing_data_in_one_line(tmp_path):
    bad_key = _train(f"--config={ROOT}/configs/quickstart.py", f"--workdir={tmp_path / 'w'}", "--config.optim.lr=1")
    assert bad_key.returncode == 2
    assert bad_key.stderr.strip().splitlines() == [
        "severjax-train: error: --config.optim.lr: unknown config key 'config.optim.lr' (defined neither by "
        f"{ROOT}/configs/quickstart.py nor by severjax.config.get_config())"]
    no_data = _train(f"--config={ROOT}/configs/b5_fpn.py", f"--workdir={tmp_path / 'w'}",
                     f"--config.data.dir={tmp_path / 'severstal'}")
    assert no_data.returncode == 2 and len(no_data.stderr.strip().splitlines()) == 1, no_data.stderr
    assert "kaggle competitions download" in no_data.stderr and str(tmp_path / "severstal") in no_data.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    bad_value = _train(f"--config={ROOT}/configs/b5_fpn.py", "--dry_run", "--config.batch_size=many")
    assert bad_value.returncode == 2
    assert bad_value.stderr.strip().splitlines() == [
        "severjax-train: error: flag --config.batch_size=many: invalid literal for int() with base 10: 'many'"]
    bad_crop = _train(f"--config={ROOT}/configs/quickstart.py", "--dry_run", "--config.data.crop=(256, 400)")
    assert bad_crop.returncode == 2 and "config.data.crop=(256, 400)" in bad_crop.stderr
    no_file = _train(f"--config={tmp_path / 'nope.py'}", "--dry_run")
    assert no_file.returncode == 2 and "nope.py" in no_file.stderr and len(no_file.stderr.strip().splitlines()) == 1


def test_dry_run_checks_a_config_without_building_the_model(tmp_path):
    ok = _train(f"--config={ROOT}/configs/quickstart.py", "--dry_run", f"--config.data.dir={tmp_path / 'synthetic'}")
    assert ok.returncode == 0, ok.stderr
    line, = ok.stdout.strip().splitlines()
    assert line.startswith(f"{ROOT}/configs/quickstart.py: valid; fpn / efficientnet-b0, global batch 8 on 1 cpu")
    assert not os.path.exists(tmp_path / "synthetic")  # nothing generated, nothing built
    no_workdir = _train(f"--config={ROOT}/configs/quickstart.py")
    assert no_workdir.returncode == 2 and "--workdir is required" in no_workdir.stderr
