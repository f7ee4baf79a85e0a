"""Checkpoints: the whole TrainState comes back bit for bit, onto the shardings asked for; the
trainable parameters alone come back without any optimizer state being built; only finished
saves are listed."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_iclemb import parallel
from jax_iclemb.checkpoint import Checkpointer, TrainState
from jax_iclemb.train_step import initial_state


def trained_state(mesh) -> TrainState:
    sharding = parallel.named_sharding(mesh, ("batch", None), (8, 4))
    rng = np.random.default_rng(0)
    params = {
        "layers": {"lora_a": jax.device_put(rng.standard_normal((8, 4), np.float32), sharding)},
        "scale": jnp.float32(0.5),
    }
    tx = optax.adamw(1e-2)
    state = initial_state(params, tx)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt = tx.update(grads, state.opt, state.params)  # non-zero optimizer moments
    return TrainState(step=state.step + 3, params=optax.apply_updates(params, updates), opt=opt)


def test_train_state_round_trips_bitwise_onto_its_shardings(tmp_path):
    mesh = parallel.make_mesh((-1, 1, 1))
    state = trained_state(mesh)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=3, keep=2)
    assert not ckpt.save(TrainState(step=jnp.int32(2), params=state.params, opt=state.opt))
    assert ckpt.save(state)  # step 3 is due
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    like = jax.tree.map(jnp.zeros_like, state)
    restored = Checkpointer(tmp_path / "checkpoints", every=1, keep=1, read_only=True).restore(
        3, like
    )
    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal(restored, state)
    assert restored.params["layers"]["lora_a"].sharding == state.params["layers"]["lora_a"].sharding
    ckpt.close()


def test_params_restore_alone_without_an_optimizer(tmp_path):
    mesh = parallel.make_mesh((-1, 1, 1))
    state = trained_state(mesh)
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
    ckpt.save(state, force=True)
    ckpt.close()
    # A reader knows the model's parameters, not the optimizer's state.
    fresh = jax.tree.map(jnp.zeros_like, state.params)
    reader = Checkpointer(tmp_path / "checkpoints", every=1, keep=1, read_only=True)
    params = reader.restore_params(3, fresh)
    chex.assert_trees_all_equal(params, state.params)
    assert params["layers"]["lora_a"].sharding == fresh["layers"]["lora_a"].sharding


def test_an_unfinished_save_is_not_listed(tmp_path):
    mesh = parallel.make_mesh((-1, 1, 1))
    ckpt = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
    ckpt.save(trained_state(mesh), force=True)
    ckpt.close()
    # What a kill mid-save leaves: orbax's temporary folder for step 7, never renamed.
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()
    reader = Checkpointer(tmp_path / "checkpoints", every=1, keep=3, read_only=True)
    assert reader.all_steps() == [3] and reader.latest_step() == 3
