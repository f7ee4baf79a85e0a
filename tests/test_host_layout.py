"""Hosts whose devices are not one contiguous block of the data axes (as on TPU torus meshes):
each host's queries must still point at its own passages.

Two processes x 2 CPU devices (the explicit launcher's variables) run this file as a script: the
trainer's own batch path (`TrainLoop.next_batch`: pipeline, tile lists, padding, `device_batch`)
on the natural, host-major mesh and on one built from an interleaved device list, where each
process holds rows [0, R) and [2R, 3R) or [R, 2R) and [3R, 4R). On both, the segment that every
query and passage slot points at in the global arrays must be the one its host packed (compared
by a fingerprint: the sum of the segment's tokens), and the loss must be the same.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def fingerprints(tokens, segment_ids, slots, segments: int):
    """Sum of the tokens of the segment at each flat slot row * segments + s (0 if empty)."""
    import jax.numpy as jnp

    row, seg = jnp.divmod(slots, segments)
    own = segment_ids[row] == (seg + 1)[..., None]
    return jnp.where(own, tokens[row], 0).sum(-1)


def probe(out: Path) -> None:
    import jax
    from conftest import TINY_OVERRIDES
    from jax.experimental import multihost_utils

    from jax_iclemb import distributed, parallel
    from jax_iclemb.config import load_config
    from jax_iclemb.data.packing import pad_batch
    from jax_iclemb.data.pipeline import pipeline_from_config
    from jax_iclemb.model.build import build_model, lora_config, split_model
    from jax_iclemb.train_loop import TrainLoop
    from jax_iclemb.train_step import StepConfig, make_loss_fn

    distributed.initialize()
    config = load_config(REPO / "configs" / "tiny.py", [*TINY_OVERRIDES, "--config.seed=3"])
    devices = jax.devices()  # process-major: p0's two devices, then p1's
    meshes = {
        "natural": parallel.make_mesh((1, -1, 1), devices),
        "interleaved": parallel.make_mesh((1, -1, 1), devices[0::2] + devices[1::2]),
    }
    pipeline = pipeline_from_config(
        config, process_index=jax.process_index(), process_count=jax.process_count(),
        row_multiple=2,  # one row group per local data shard
    )
    local, _ = pipeline.batch(0)
    result = {}
    for name, mesh in meshes.items():
        loop = TrainLoop(
            config, out, pipeline, mesh, None, None, flops_token=0, graphdef=None
        )
        batch, _, _ = loop.next_batch(0)
        segments = batch.max_segments  # the step's segment slots (packing.segment_bucket)
        rows = parallel.process_rows(batch.tokens.sharding, batch.tokens.shape)
        # What this host packed (padded as next_batch pads it), fingerprinted on its own rows,
        # gathered over hosts in process order, as the per-query arrays are.
        padded = pad_batch(
            local, num_rows=len(rows), num_queries=pipeline.max_local_queries,
            num_segments=segments, pad_id=pipeline.tokenizer.pad_token_id or 0, groups=2,
        )
        expected = {
            slot: multihost_utils.process_allgather(
                np.asarray(fingerprints(
                    padded.tokens, padded.segment_ids, getattr(padded, slot), segments
                )),
                tiled=True,
            ).tolist()
            for slot in ("query_slot", "passage_slot")
        }
        with jax.set_mesh(mesh):
            got = {
                slot: np.asarray(jax.jit(fingerprints, static_argnums=3)(
                    batch.tokens, batch.segment_ids, getattr(batch, slot), segments
                )).tolist()
                for slot in ("query_slot", "passage_slot")
            }
            model, _ = build_model(
                config.model, lora_config(config.lora, config.train.trainable),
                seed=config.seed, mesh=mesh, vocab_size=len(pipeline.tokenizer),
            )
            graphdef, params, frozen = split_model(model)
            loss, _ = jax.jit(make_loss_fn(graphdef, StepConfig.from_config(config)))(
                params, frozen, batch, jax.numpy.zeros((), jax.numpy.int32)
            )
        result[name] = {
            "blocks": int(np.sum(np.diff(rows) != 1) + 1),  # contiguous row blocks of this host
            "expected": expected, "got": got, "loss": float(loss),
        }
    # Rows replicated over a tensor axis that spans both hosts: no host holds just its own rows.
    loop.mesh = parallel.make_mesh((1, 1, -1), devices)
    try:
        loop.next_batch(0)
    except ValueError as e:
        result["tensor_across_hosts"] = str(e)
    (out / f"proc-{jax.process_index()}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("host_layout")
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out)],
            env=dict(
                os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
            ),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    return [json.loads((out / f"proc-{i}.json").read_text()) for i in range(2)]


def test_the_interleaved_mesh_really_splits_each_host(probed):
    for host in probed:
        assert host["natural"]["blocks"] == 1
        assert host["interleaved"]["blocks"] == 2


@pytest.mark.parametrize("layout", ["natural", "interleaved"])
@pytest.mark.parametrize("slot", ["query_slot", "passage_slot"])
def test_every_slot_points_at_the_segment_its_host_packed(probed, layout, slot):
    for host in probed:
        assert host[layout]["got"][slot] == host[layout]["expected"][slot]


def test_the_loss_does_not_depend_on_the_device_order(probed):
    losses = [host[layout]["loss"] for host in probed for layout in ("natural", "interleaved")]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-5)


def test_rows_replicated_across_hosts_fail_loudly(probed):
    for host in probed:
        message = host.get("tensor_across_hosts", "no error")
        held = re.match(r"this process's devices hold (\d+) of the step's (\d+) rows, but it "
                        r"packed (\d+)", message)
        assert held, message
        held, total, packed = map(int, held.groups())
        assert held == total == 2 * packed


if __name__ == "__main__":  # one process of the fixture's run (conftest is on the path)
    probe(Path(sys.argv[1]))
