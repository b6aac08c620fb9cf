"""Loss, schedules and the two-group RAdam against numpy / scipy / torch references."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
import scipy.stats

from severjax import losses, optim

OPTIM = dict(b1=0.9, b2=0.999, eps=1e-8, threshold=5.0, encoder_lr=7e-5, encoder_wd=3e-5, decoder_lr=3e-3,
             decoder_wd=3e-4, clip_norm=0.0, schedule="constant", flat_epochs=0)


def _numpy_loss(logits, masks, eps=1e-7):
    x = logits.astype(np.float64)
    t = masks.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    bce = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    dice = (2 * np.sum(p * t) + eps) / (np.sum(p) + np.sum(t) + eps)
    return 0.6 * bce + 0.4 * (1 - dice), bce, 1 - dice


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 8, 12, 4)).astype(np.float32)
    masks = (rng.random((3, 8, 12, 4)) < 0.3).astype(np.float32)
    terms = jax.jit(losses.bce_dice_loss)(jnp.asarray(logits), jnp.asarray(masks))
    want = _numpy_loss(logits, masks)
    np.testing.assert_allclose([float(terms.loss), float(terms.bce), float(terms.dice_loss)], want, rtol=1e-5)


def test_loss_empty_masks_and_bfloat16_logits():
    logits = jnp.full((2, 4, 4, 4), -40.0, jnp.bfloat16)
    masks = jnp.zeros((2, 4, 4, 4))
    terms = jax.jit(losses.bce_dice_loss)(logits, masks)
    assert terms.loss.dtype == jnp.float32
    # all-empty prediction of an all-empty truth: Dice (0 + eps) / (~0 + eps) is ~1, BCE ~0
    assert float(terms.bce) < 1e-6 and float(terms.dice_loss) < 0.01


def test_sharded_loss_value_and_mean_gradient_equal_the_global_ones():
    """With axis_name, each shard sees the global Dice and the mean of the shard gradients is exact."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 2, (8, 4, 6, 4)).astype(np.float32))
    masks = jnp.asarray((rng.random((8, 4, 6, 4)) < 0.4).astype(np.float32))
    scale = jnp.asarray(0.7)

    def global_loss(s):
        return losses.bce_dice_loss(logits * s, masks).loss

    def global_dice(s):
        return losses.bce_dice_loss(logits * s, masks).dice_loss

    def shard_loss(s, lg, mk):
        terms = losses.bce_dice_loss(lg * s, mk, axis_name="batch")
        return terms.loss, terms.dice_loss

    shards = lambda a: a.reshape((4, 2) + a.shape[1:])
    (values, dice), grads = jax.jit(jax.vmap(jax.value_and_grad(shard_loss, has_aux=True), in_axes=(None, 0, 0),
                                             axis_name="batch"))(scale, shards(logits), shards(masks))
    want_value, want_grad = jax.jit(jax.value_and_grad(global_loss))(scale)
    # BCE stays the shard's mean (their mean is the global mean); the Dice term is the global one
    np.testing.assert_allclose(float(jnp.mean(values)), float(want_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dice), float(jax.jit(global_dice)(scale)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(grads)), float(want_grad), rtol=1e-5)


@pytest.mark.parametrize("name", ["flat_logistic", "flat_cosine", "constant"])
def test_schedules_follow_their_formulas(name):
    steps_per_epoch, epochs, flat = 10, 250, 30
    schedule = optim.make_schedule(name, base_lr=3e-3, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                   flat_epochs=flat)
    length = epochs - flat
    for step in (0, 155, 299, 300, 301, 1234, 1400, 2000, 2499, 2500):
        epoch = step / steps_per_epoch
        x = epoch - flat
        if name == "constant" or epoch < flat:
            want = 1.0
        elif name == "flat_logistic":
            want = scipy.stats.logistic.sf(x, loc=length / 2, scale=length / 10)
        else:
            want = 0.5 * (1 + np.cos(np.pi * x / length))
        np.testing.assert_allclose(float(schedule(step)), 3e-3 * want, rtol=2e-5, atol=3e-3 * 1e-6,
                                   err_msg=f"{name} at step {step}")


def test_flat_logistic_reproduces_the_originals_per_epoch_values():
    """The original stepped per epoch with n_epochs = epochs + 1: ~0.9933 / 0.506 / 0.063 / 0.007."""
    mult = lambda e: float(optim.lr_multiplier("flat_logistic", e, epochs=251, flat_epochs=30))
    np.testing.assert_allclose([mult(30), mult(140), mult(200), mult(250)],
                               [0.9933, 0.506, 0.063, 0.007], atol=6e-4)
    assert mult(29.99) == 1.0


def _tree():
    rng = np.random.default_rng(2)
    leaf = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return {"encoder": {"conv": {"kernel": leaf(3, 3, 2, 4), "bias": leaf(4)}, "bn": {"scale": leaf(4)}},
            "decoder": {"conv": {"kernel": leaf(3, 3, 4, 2), "bias": leaf(2)}},
            "head": {"bias": leaf(4)}}


def test_each_parameter_gets_its_groups_lr_and_weight_decay():
    params = _tree()
    tx, schedules = optim.create_optimizer(OPTIM, steps_per_epoch=10, epochs=5)
    state = tx.init(params)
    # Zero gradients: RAdam's step is 0, the update is the decoupled decay -lr * wd * p alone.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    tx_update = jax.jit(tx.update)  # one compile instead of one per eager op
    updates, state = tx_update(zeros, state, params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        group = "encoder" if path[0].key == "encoder" else "decoder"
        p = _at(params, path)
        np.testing.assert_allclose(update, -OPTIM[f"{group}_lr"] * OPTIM[f"{group}_wd"] * p, rtol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # First step with gradients: N_sma < 5, so RAdam takes the un-normalised bias-corrected momentum
    # step m_hat = g: the update is -lr * (g + wd * p).
    state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: 0.5 * p + 1.0, params)
    updates, _ = tx_update(grads, state, params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        group = "encoder" if path[0].key == "encoder" else "decoder"
        p, g = _at(params, path), _at(grads, path)
        np.testing.assert_allclose(update, -OPTIM[f"{group}_lr"] * (g + OPTIM[f"{group}_wd"] * p), rtol=1e-6)
    assert float(schedules["encoder"](0)) == pytest.approx(7e-5)
    assert float(schedules["decoder"](0)) == pytest.approx(3e-3)


def _at(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return np.asarray(tree)


def test_radam_matches_torch_radam_with_decoupled_decay():
    """12 steps (un-rectified for t <= 5, rectified after) against torch.optim.RAdam."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=(5, 7)).astype(np.float32)
    grads = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(12)]
    config = dict(OPTIM, encoder_lr=1e-2, encoder_wd=1e-2)
    tx, _ = optim.create_optimizer(config, steps_per_epoch=1, epochs=12)
    params = {"encoder": {"w": jnp.asarray(p0)}, "decoder": {"w": jnp.zeros(1)}}
    state = tx.init(params)
    tx_update = jax.jit(tx.update)
    t_param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    t_opt = torch.optim.RAdam([t_param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                              decoupled_weight_decay=True)
    for g in grads:
        updates, state = tx_update({"encoder": {"w": jnp.asarray(g)}, "decoder": {"w": jnp.zeros(1)}},
                                   state, params)
        params = optax.apply_updates(params, updates)
        t_param.grad = torch.from_numpy(g.copy())
        t_opt.step()
        # eps placement differs (torch adds it before bias correction) and float32 rounding: both far
        # below a step (lr 1e-2)
        np.testing.assert_allclose(np.asarray(params["encoder"]["w"]), t_param.detach().numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_clip_norm_and_missing_encoder_key():
    params = _tree()
    tx, _ = optim.create_optimizer(dict(OPTIM, clip_norm=1.0, encoder_wd=0.0, decoder_wd=0.0),
                                   steps_per_epoch=1, epochs=1)
    grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # step 1: update = -lr * clipped g; the clipped gradients have global norm 1
    enc = jax.tree_util.tree_map(lambda u: u / -OPTIM["encoder_lr"], updates["encoder"])
    dec = jax.tree_util.tree_map(lambda u: u / -OPTIM["decoder_lr"], {k: updates[k] for k in ("decoder", "head")})
    np.testing.assert_allclose(float(optax.global_norm((enc, dec))), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="no top-level 'encoder' key"):
        tx.init({"backbone": {"w": jnp.zeros(2)}})
    with pytest.raises(ValueError, match="config.optim.schedule='cosine'"):
        optim.make_schedule("cosine", base_lr=1.0, steps_per_epoch=1, epochs=1, flat_epochs=0)
