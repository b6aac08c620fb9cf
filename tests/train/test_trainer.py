"""The trainer: pmapped step == single-device step, several steps a call, precise BN, initial weights,
multi-process steps and checkpoints, the loop's schedule, resume after SIGKILL, task scores.

Multi-device cases run this file as a script in a subprocess (``python tests/train/test_trainer.py <case>``)
because ``--xla_force_host_platform_device_count`` must be set before JAX initialises.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS = {"bce_weight": 0.6, "dice_weight": 0.4, "dice_eps": 1e-7}
OPTIM = dict(b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, encoder_lr=1e-2, encoder_wd=3e-5, decoder_lr=3e-2,
             decoder_wd=3e-4, clip_norm=0.0, schedule="flat_cosine", flat_epochs=1)
GLOBAL_BATCH, SIZE = 16, 32


# ------------------------------------------------------------------------ helpers (also in scripts)


def _tiny_model(use_bn: bool, dropout: float = 0.0):
    import flax.linen as nn

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Conv(8, (3, 3), name="conv0")(x)
            if use_bn:
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
            return nn.relu(h)

    class Tiny(nn.Module):
        """encoder: conv (+BN) relu; decoder: conv, relu, dropout, 1x1 conv to 4 classes."""

        @nn.compact
        def __call__(self, x, train: bool = False):
            h = Encoder(name="encoder")(x, train)
            h = nn.Conv(8, (3, 3), name="conv1")(h)
            h = nn.Dropout(dropout, deterministic=not train)(nn.relu(h))
            return nn.Conv(4, (1, 1), name="head")(h)

    return Tiny()


def _tiny_state(use_bn: bool, dropout: float = 0.0):
    import jax
    import jax.numpy as jnp

    from severjax import optim
    from severjax.train.state import TrainState

    model = _tiny_model(use_bn, dropout)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 1)))
    tx, schedules = optim.create_optimizer(OPTIM, steps_per_epoch=2, epochs=3)
    state = jax.jit(lambda v: TrainState.create(apply_fn=model.apply, params=v["params"], tx=tx,
                                                batch_stats=v.get("batch_stats", {}),
                                                rng=jax.random.key_data(jax.random.key(1))))(variables)
    return state, schedules


def _batch(seed: int = 0, n: int = GLOBAL_BATCH):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, SIZE, SIZE, 1)).astype(np.float32)
    mask = np.zeros((n, SIZE, SIZE, 4), np.float32)
    for i in range(n):  # a few rectangles correlated with the image, so there is a signal to learn
        c, y, x = i % 4, rng.integers(0, SIZE - 8), rng.integers(0, SIZE - 8)
        if i % 3:
            mask[i, y:y + 8, x:x + 8, c] = 1.0
            image[i, y:y + 8, x:x + 8, 0] += 1.5 + c
    return {"image": image, "mask": mask}


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _run_script(case: str, *args: str, devices: int = 8, timeout: int = 400) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


# ----------------------------------------------------------------------------- pmap == one device


def test_pmapped_step_on_8_devices_equals_one_device_step():
    """Two steps on 8 fake CPU devices vs one device over the same global batch of 16.

    "Equal" (1e-5): without BatchNorm the 8-device step IS the single-device step (the Dice term is a
    global sum, gradients are pmean'd). With BatchNorm each device normalises with its own 2 images'
    statistics (as PyTorch DataParallel did), so the single-device reference computes BN statistics
    per group of 2 images ("ghost" batches) and averages the groups' running statistics - what the
    pmean of batch_stats after the step gives. Dropout off.
    """
    out = _run_script("eight_devices")
    assert "OK bn=False" in out and "OK bn=True" in out, out


def _case_eight_devices() -> None:
    import functools

    import jax
    from flax import jax_utils

    from severjax.train.segmentation import train_step
    from severjax.train.state import replicate_state

    assert jax.local_device_count() == 8, jax.devices()
    for use_bn in (False, True):
        state, schedules = _tiny_state(use_bn)
        p_step = jax.pmap(functools.partial(train_step, loss_config=LOSS, schedules=schedules),
                          axis_name="batch", in_axes=(0, 0, None))
        p_state = replicate_state(state)
        ref = state
        for step in range(2):
            batch = _batch(step)
            sharded = {k: v.reshape((8, -1) + v.shape[1:]) for k, v in batch.items()}
            p_state, p_metrics = p_step(p_state, sharded, jax.random.key(step))
            if use_bn:
                ref, metrics = _ghost_bn_step(ref, batch, groups=8)
            else:
                ref, metrics = jax.jit(functools.partial(train_step, loss_config=LOSS, schedules=schedules,
                                                         axis_name=None))(ref, batch, jax.random.key(step))
            got = jax.device_get(jax_utils.unreplicate(p_metrics))
            np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=1e-5, atol=1e-6)
        got_state = jax.device_get(jax_utils.unreplicate(p_state))
        for name, tree in (("params", "params"), ("opt_state", "opt_state"), ("batch_stats", "batch_stats")):
            want, have = _flat(getattr(ref, tree)), _flat(getattr(got_state, tree))
            assert want.keys() == have.keys()
            for key in want:
                np.testing.assert_allclose(have[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"{name}{key}")
        # every device holds the same replica after the steps
        for leaf in jax.tree_util.tree_leaves(p_state.params):
            np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[7]))
        if use_bn:
            assert _flat(got_state.batch_stats), "BN model has no batch_stats"
        print(f"OK bn={use_bn}")


def _ghost_bn_step(state, batch, groups: int):
    """Single-device reference: BN statistics per group of B/groups images, one global loss."""
    import jax
    import jax.numpy as jnp

    from severjax import losses

    def loss_fn(params):
        logits, stats = [], []
        for image in np.split(batch["image"], groups):
            out, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, image, train=True,
                                      mutable=["batch_stats"])
            logits.append(out)
            stats.append(upd["batch_stats"])
        terms = losses.bce_dice_loss(jnp.concatenate(logits), batch["mask"], bce_weight=0.6, dice_weight=0.4,
                                     eps=1e-7)
        mean_stats = jax.tree_util.tree_map(lambda *s: sum(s) / len(s), *stats)
        return terms.loss, mean_stats

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
    new = state.apply_gradients(grads=grads).replace(batch_stats=stats)
    return new, {"loss": float(loss)}


def test_batch_norm_recalibration_gives_the_exact_batch_statistics():
    """Precise BN: the running statistics become the mean over batches of each batch's statistics,
    whatever the layer's momentum (flax's 0.9 here; the EfficientNet encoders use torch's 0.01)."""
    import jax
    import jax.numpy as jnp
    from flax import jax_utils

    from severjax.train import batch_norm
    from severjax.train.state import replicate_state

    state, _ = _tiny_state(use_bn=True)
    batches = [_batch(0, n=4), _batch(1, n=4)]
    p_stats = jax.pmap(batch_norm.statistics_step, axis_name="batch", in_axes=(0, 0, None))
    p_state = batch_norm.recalibrate(p_stats, replicate_state(state), batches, jax.random.key(0))
    got = jax.device_get(jax_utils.unreplicate(p_state.batch_stats))["encoder"]["bn"]
    conv = state.params["encoder"]["conv0"]
    means, variances = [], []
    for batch in batches:
        h = jax.lax.conv_general_dilated(batch["image"], conv["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
        means.append(jnp.mean(h, axis=(0, 1, 2)))
        variances.append(jnp.var(h, axis=(0, 1, 2)))  # flax's BatchNorm keeps the biased variance
    np.testing.assert_allclose(got["mean"], np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], np.mean(variances, axis=0), rtol=1e-4, atol=1e-5)
    # the parameters are untouched
    for key, value in _flat(jax_utils.unreplicate(p_state.params)).items():
        np.testing.assert_array_equal(value, _flat(state.params)[key])


def test_init_weights_load_an_export_and_reject_one_that_does_not_fit(tmp_path):
    """config.init_weights: an exported model's variables replace the initial ones, shapes checked."""
    import functools

    import jax
    import jax.numpy as jnp

    from severjax.export import save_model
    from severjax.models import create_model
    from severjax.train.state import load_init_weights

    def variables(classes):  # shapes only (no init compile), then distinct values
        model = create_model("unet", "efficientnet-b0", classes=classes, in_channels=1)
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jnp.zeros((1, 64, 64, 1)))
        leaves, tree = jax.tree_util.tree_flatten(shapes)
        return jax.tree_util.tree_unflatten(tree, [np.full(x.shape, i, x.dtype) for i, x in enumerate(leaves)])

    exported = variables(4)
    save_model(str(tmp_path / "m4"), exported, {"arch": "unet", "encoder": "efficientnet-b0", "classes": 4,
                                                "in_channels": 1})
    like = jax.tree_util.tree_map(np.zeros_like, exported)
    loaded = _flat(load_init_weights(str(tmp_path / "m4"), like))
    for key, value in _flat(exported).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    with pytest.raises(ValueError, match=r"does not fit the configured model: .*segmentation_head.*shape"):
        load_init_weights(str(tmp_path / "m4"), variables(3))


# ------------------------------------------------------------------------------ steps per call


def test_several_steps_a_call_equal_the_same_steps_one_by_one():
    """``train_steps`` over 3 stacked batches (one unrolled program) == 3 single ``train_step`` calls with
    the ``step_keys`` of those steps: same params, BN statistics, optimizer step and per-step metrics.
    Dropout on, so each step must get its own key."""
    import functools

    import jax

    from severjax.train import steps
    from severjax.train.segmentation import train_step

    state, schedules = _tiny_state(use_bn=True, dropout=0.3)
    step_fn = functools.partial(train_step, loss_config=LOSS, schedules=schedules, axis_name=None)
    base_key = jax.random.key(7)
    batches = [{k: v[:4] for k, v in _batch(i).items()} for i in range(3)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    many, metrics = jax.jit(functools.partial(steps.train_steps, step_fn=step_fn))(
        state, stacked, steps.step_keys(base_key, 5, 3))
    one = jax.jit(step_fn)
    for i, batch in enumerate(batches):
        state, m = one(state, batch, jax.random.fold_in(base_key, 5 + i))
        for key, value in m.items():
            np.testing.assert_allclose(metrics[key][i], value, rtol=1e-5, atol=1e-6, err_msg=f"step {i} {key}")
    assert int(many.step) == int(state.step) == 3
    for tree in ("params", "batch_stats", "opt_state"):
        want, got = _flat(getattr(state, tree)), _flat(getattr(many, tree))
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{tree} {key}")


def test_calls_never_straddle_an_epoch_end_or_a_checkpoint():
    """``call_length``: full calls where they fit before the next epoch end / checkpoint / the end, single
    steps in the gap; a resumed run (starting at a boundary) cuts its calls where the first run did."""
    from severjax.ops import policy
    from severjax.train.steps import call_length

    def cuts(start, total, per_call=3, periods=(10, 4)):
        out, step = [], start
        while step < total:
            n = call_length(step, per_call, periods, total)
            out.append(n)
            step += n
        return out

    # epochs of 10 steps, checkpoints every 4: boundaries 4, 8, 10, 12, 16, 20
    assert cuts(0, 20) == [3, 1, 3, 1, 1, 1, 1, 1, 3, 1, 3, 1]
    assert sum(cuts(0, 20)) == 20 and cuts(8, 20) == cuts(0, 20)[4:]  # resuming at step 8
    assert cuts(0, 7, per_call=1) == [1] * 7
    assert cuts(0, 12, per_call=4, periods=(12,)) == [4, 4, 4]
    # config.steps_per_call = 0: the policy's choice (the trainer's start-up line names it)
    with policy.platform("cpu"):
        assert policy.steps_per_call(0, huge_pages=False) == 3
        assert policy.steps_per_call(0, huge_pages=True) == 1
        assert policy.steps_per_call(2, huge_pages=True) == 2
    with policy.platform("cuda"):
        assert policy.steps_per_call(0, huge_pages=False) == 1


# ------------------------------------------------------------------------------- multi-process


@pytest.mark.multiprocess
def test_two_processes_train_together_through_jax_distributed(tmp_path):
    """2 processes x 2 CPU devices (gloo) take two steps in one call; equal to one device over the global batch.

    They also write a train-state checkpoint (each process its own loader position) and an export.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "two_processes", str(port), str(i),
                               str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-6000:]

    import functools

    import jax

    from severjax.train.segmentation import train_step

    state, schedules = _tiny_state(use_bn=False)
    step = jax.jit(functools.partial(train_step, loss_config=LOSS, schedules=schedules, axis_name=None))
    for i in range(2):
        state, _ = step(state, _batch(i), jax.random.key(i))
    got = np.load(tmp_path / "params.npz")
    want = _flat(state.params)
    assert sorted(got.files) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the checkpoint holds each process's loader position; the export is loadable
    loader_dir = tmp_path / "checkpoints" / "2" / "loader"
    assert sorted(n for n in os.listdir(loader_dir) if n.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    exported = json.loads((tmp_path / "export" / "model.json").read_text())
    assert exported == {"arch": "tiny"}
    assert (tmp_path / "export" / "variables").is_dir()


class _Position:
    """The get_state/set_state half of an input iterator: which batch comes next, as bytes."""

    def __init__(self, tag: str):
        self.state = tag.encode()

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state


def _case_two_processes(port: str, process_id: str, out_dir: str) -> None:
    import functools

    import jax
    from flax import jax_utils
    import ml_collections

    from severjax import export
    from severjax.train import checkpoint, steps
    from severjax.train.distributed import initialize_distributed
    from severjax.train.segmentation import train_step
    from severjax.train.state import host_variables, replicate_state

    pid = int(process_id)
    assert initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    state, schedules = _tiny_state(use_bn=False)
    step_fn = functools.partial(train_step, loss_config=LOSS, schedules=schedules)
    p_steps = jax.pmap(functools.partial(steps.train_steps, step_fn=step_fn), axis_name=steps.AXIS,
                       in_axes=(0, 0, None))
    p_state = replicate_state(state)
    # both steps in one call (config.steps_per_call = 2), each process stacking its own shards
    local = [{k: v[pid * 8:(pid + 1) * 8] for k, v in _batch(i).items()} for i in range(2)]
    p_state, metrics = p_steps(p_state, steps.stack_batches(local), steps.step_keys(jax.random.key(0), 0, 2))
    assert metrics["loss"].shape == (2, 2)  # (local devices, steps)
    config = ml_collections.ConfigDict({"keep_checkpoints": 2})
    manager = checkpoint.create_manager(os.path.join(out_dir, "checkpoints"), config)
    checkpoint.save(manager, 2, p_state, _Position(f"process {pid}"), {"best_val_dice": None}, None)
    manager.wait_until_finished()
    restored_loader = _Position("")
    restored, meta = checkpoint.restore(manager, jax_utils.unreplicate(p_state), restored_loader)
    assert restored_loader.state == f"process {pid}".encode(), restored_loader.state
    assert int(restored.step) == 2 and meta == {"best_val_dice": None}
    manager.close()
    export.export_model(os.path.join(out_dir, "export"), host_variables(p_state), {"arch": "tiny"})
    if pid == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **_flat(host_variables(p_state)["params"]))
    print("OK process", pid)


# ---------------------------------------------------------------------- resume after SIGKILL (CLI)

RUN_CONFIG = """
import ml_collections

from severjax import config as defaults

def get_config():
    c = defaults.get_config()
    c.seed = 3
    c.batch_size = 4
    c.eval_batch_size = 4
    c.epochs = 2
    c.steps_per_epoch = 3
    c.checkpoint_every = 2
    c.steps_per_call = 2  # calls of 2 steps where they fit, single steps around step 3 (epoch end)
    c.keep_checkpoints = 10
    c.log_every = 1
    c.progress_bar = False
    c.data.dir = {data!r}
    c.data.synthetic = ml_collections.ConfigDict(dict(n_train=16, n_test=2, seed=0))
    c.data.crop = (64, 128)
    c.data.limit_val = 2
    c.model.arch = "unet"
    c.model.encoder = "efficientnet-b0"
    c.model.dropout = 0.2
    c.optim.schedule = "flat_cosine"
    c.optim.flat_epochs = 1
    return c
"""


def _train_cmd(config_path, workdir):
    return [sys.executable, "-m", "severjax.train", f"--config={config_path}", f"--workdir={workdir}"]


def _train_env(cache_dir):
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _finished_steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _restore_raw(workdir, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return _flat(ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state")))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run A: ``python -m severjax.train`` straight through 6 steps (2 epochs of 3, dropout on) on a
    16-image synthetic set. Later runs share its data folder and persistent compilation cache."""
    root = tmp_path_factory.mktemp("trainer_runs")
    config_path = root / "run.py"
    config_path.write_text(RUN_CONFIG.format(data=str(root / "data")))
    env = _train_env(root / "jax_cache")
    done = subprocess.run(_train_cmd(config_path, root / "a"), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return {"root": root, "config": config_path, "env": env, "workdir": root / "a", "summary": summary}


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_is_bit_identical_to_an_uninterrupted_run(finished_run):
    """Run B is SIGKILLed right after its first checkpoint (step 2), then restarted in the same workdir.

    The restart must restore params, optimizer state, step, rng and the input position: B's final
    state (and exported model) equals A's bit for bit.
    """
    config_path, env, run_a = finished_run["config"], finished_run["env"], finished_run["workdir"]
    run_b = finished_run["root"] / "b"
    summary = finished_run["summary"]
    assert summary["step"] == 6 and summary["stopped"] == "done" and summary["score_name"] == "dice_mean"
    assert 0.0 <= summary["best_val_score"] <= 1.0 and summary["best_step"] in (3, 6)

    proc = subprocess.Popen(_train_cmd(config_path, run_b), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _finished_steps(run_b) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run B ended before it could be killed:\n{err[-4000:]}"
    killed_at = _finished_steps(run_b)
    assert killed_at and max(killed_at) < 6, killed_at

    resumed = subprocess.run(_train_cmd(config_path, run_b), env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["step"] == 6

    want, got = _restore_raw(run_a, 6), _restore_raw(run_b, 6)
    assert want.keys() == got.keys()
    different = [k for k in want if not np.array_equal(want[k], got[k])]
    assert not different, f"{len(different)} leaves differ after resuming from step {max(killed_at)}: {different[:5]}"
    assert any("opt_state" in k for k in want) and any("rng" in k for k in want)

    from severjax.export import load_model

    _, _, spec = load_model(str(run_a))  # a workdir resolves to its model_best
    cwd = os.getcwd()
    try:  # a relative workdir (tools/quickstart.sh's default runs/quickstart) loads too
        os.chdir(run_a.parent)
        assert load_model(run_a.name)[2] == spec
    finally:
        os.chdir(cwd)
    assert spec["normalize"] == {"mean": 0.3439, "std": 0.0383} and spec["arch"] == "unet"
    _, last_a, spec_a = load_model(str(run_a / "model_last"))
    _, last_b, spec_b = load_model(str(run_b / "model_last"))
    assert spec_a == spec_b
    flat_b = _flat(last_b)
    for key, value in _flat(last_a).items():
        np.testing.assert_array_equal(value, flat_b[key], err_msg=key)
    assert os.path.isfile(run_a / "config.json") and os.listdir(run_a / "tensorboard")


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(finished_run):
    """Resume a copy of run A's step-2 checkpoint with non-finite images (data.std=1e-45: 1/std overflows
    float32): the first step's loss is NaN; the run stops naming the step and the last good checkpoint, and
    the epoch-end save at step 3 never happens. (Huge finite images, ~1e30, would not do: train-mode
    BatchNorm's centred variance overflows to inf and scales them to 0, a finite loss.)"""
    import shutil

    workdir = finished_run["root"] / "nan"
    os.makedirs(workdir / "checkpoints")
    shutil.copytree(finished_run["workdir"] / "checkpoints" / "2", workdir / "checkpoints" / "2")
    run = subprocess.run(_train_cmd(finished_run["config"], workdir) + ["--config.data.std=1e-45"],
                         env=finished_run["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "FloatingPointError: non-finite" in run.stderr and "at step 3" in run.stderr, run.stderr[-3000:]
    assert "the last good checkpoint is step 2" in run.stderr
    assert _finished_steps(workdir) == [2]
    assert not os.path.exists(workdir / "model_last")


# --------------------------------------------------------------------- the loop's schedule, tasks


def test_the_loop_logs_evaluates_and_saves_at_the_right_steps():
    """Epochs of 10 steps, 3 epochs, evaluations every 2nd epoch, checkpoints every 4 steps, logs every 5."""
    from severjax.train.loop import (epoch_length, record_evaluation, stopped_early, time_to_evaluate,
                                     time_to_log, time_to_save)

    assert [d for d in range(1, 31) if time_to_log(d, 1, 5, 10, 30)] == [5, 10, 15, 20, 25, 30]
    assert time_to_log(7, 3, 5, 10, 30) and not time_to_log(9, 2, 5, 10, 30)  # a call of 3 passed step 5
    assert time_to_log(7, 1, 50, 10, 7)  # the run's end
    assert [d for d in range(1, 31) if time_to_evaluate(d, 10, 2, 30)] == [20, 30]  # every 2nd epoch, the last
    assert [d for d in range(1, 31) if time_to_evaluate(d, 10, 1, 30)] == [10, 20, 30]
    assert [d for d in range(1, 31) if time_to_save(d, 4, 30)] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert not stopped_early(100, 0) and not stopped_early(2, 3) and stopped_early(3, 3)
    assert epoch_length(17, 4) == 4
    with pytest.raises(ValueError, match="config.batch_size=32"):
        epoch_length(17, 32)

    meta = {"best_val_score": None, "best_step": None, "epochs_since_best": 0, "val": None}
    meta, best = record_evaluation(meta, {"dice_mean": 0.5}, 0.5, 10, 2)
    assert best and meta == {"best_val_score": 0.5, "best_step": 10, "epochs_since_best": 0,
                             "val": {"dice_mean": 0.5}}
    meta, best = record_evaluation(meta, {"dice_mean": 0.4}, 0.4, 20, 2)
    assert not best and meta["best_step"] == 10 and meta["epochs_since_best"] == 2 and meta["val"]["dice_mean"] == 0.4
    meta, best = record_evaluation(meta, {"dice_mean": 0.6}, 0.6, 30, 2)
    assert best and meta["best_step"] == 30 and meta["epochs_since_best"] == 0


def _config(name: str):
    """configs/<name>.py's config."""
    from severjax import config as config_lib

    return config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"))


def test_classifier_best_model_is_chosen_by_auc_and_accuracy_only_where_no_auc_is_defined():
    from severjax.train.tasks import make_task

    task = make_task(_config("cls_b0_quick"), schedules={})
    assert task.score({"auc_mean": 0.75, "accuracy_mean": 0.9}) == 0.75
    assert task.score({"auc_mean": float("nan"), "accuracy_mean": 0.9}) == 0.9
    with pytest.raises(FloatingPointError, match="auc_mean"):
        task.score({"auc_mean": float("nan"), "accuracy_mean": float("nan")})
    seg = make_task(_config("quickstart"), schedules={})
    with pytest.raises(FloatingPointError, match="dice_mean is nan"):
        seg.score({"dice_mean": float("nan")})


# ---------------------------------------------------------------------------------------- main


if __name__ == "__main__":
    {"eight_devices": _case_eight_devices, "two_processes": _case_two_processes}[sys.argv[1]](*sys.argv[2:])
