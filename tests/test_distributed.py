"""Start-up of multi-process JAX (jax_iclemb.distributed): every launcher reaches one call of
`jax.distributed.initialize` (recorded here by a stand-in), with JAX_LOCAL_DEVICE_IDS passed on
every path; malformed variables get a clear error and the trainer's CLI exits 2. The 2-process
runs that really initialise are in tests/test_multiprocess.py."""

import logging

import jax
import pytest
from conftest import REPO

from jax_iclemb import distributed, train

IDS = {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
EXPLICIT = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2",
}
# What a 2-node, 1-task-per-node `srun` sets on its second node (as jax's slurm_cluster reads it).
SLURM = {
    "SLURM_JOB_ID": "777", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NODELIST": "node[01-02]",
    "SLURM_STEP_NUM_NODES": "2",
}
TPU_POD = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
EXPLICIT_ARGS = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every `jax.distributed.initialize` call (none is made)."""
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    return recorded


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (EXPLICIT, EXPLICIT_ARGS),
        (SLURM, {}),  # JAX reads the SLURM variables itself
        (TPU_POD, {}),
    ],
    ids=["explicit", "slurm", "tpu_pod"],
)
@pytest.mark.parametrize("ids", [[0, 1, 2, 3], None], ids=["ids", "no-ids"])
def test_every_launcher_passes_the_local_device_ids(calls, env, expected, ids):
    full = dict(env, **(IDS if ids else {}))
    distributed.initialize(full)
    assert calls == [dict(expected, local_device_ids=ids)]


def test_one_process_starts_nothing_and_logs_its_devices(calls, caplog):
    with caplog.at_level(logging.INFO, logger="jax_iclemb.distributed"):
        distributed.initialize({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", **IDS})
    assert calls == []
    assert f"single process: 1 process x {jax.local_device_count()} local devices" in caplog.text


def test_start_up_logs_processes_times_local_devices(calls, caplog):
    with caplog.at_level(logging.INFO, logger="jax_iclemb.distributed"):
        distributed.initialize(dict(SLURM, **IDS))
    # The stand-in started nothing, so JAX still reports this one process.
    assert f"slurm: 1 process x {jax.local_device_count()} local devices" in caplog.text
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in caplog.text


def test_passed_ids_override_jaxs_one_gpu_per_slurm_task(monkeypatch):
    """JAX's own SLURM detection (what the real call does with our arguments): with the ids it
    keeps them; without, it would drive GPU $SLURM_LOCALID alone."""
    from jax._src.clusters import ClusterEnv

    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    _, kwargs = distributed.launch_arguments(dict(SLURM, **IDS))
    detect = lambda ids: ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, ids, None, 300
    )
    address, count, index, ids = detect(kwargs["local_device_ids"])
    assert (address.split(":")[0], count, index, ids) == ("node01", 2, 1, [0, 1, 2, 3])
    assert detect(None)[3] == [0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (dict(EXPLICIT, JAX_LOCAL_DEVICE_IDS="0,one"), "comma-separated device ordinals"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
        (dict(EXPLICIT, JAX_PROCESS_ID="first"), "JAX_PROCESS_ID must be an integer"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "start the trainer with srun"),
    ],
)
def test_malformed_launch_variables_name_the_culprit(calls, env, message):
    with pytest.raises(distributed.LaunchError, match=message):
        distributed.initialize(env)
    assert calls == []


def test_trainer_cli_exits_2_on_a_bad_launch_and_leaves_nothing(calls, monkeypatch, tmp_path,
                                                                 capsys):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    workdir = tmp_path / "run"
    code = train.main(["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not"
    )
    assert not workdir.exists() and calls == []
