"""What a run reports: metrics.jsonl, TensorBoard events, optionally Weights & Biases, a progress
bar, and the FLOP model.

FLOP model (per real token, documented in docs/training.md): a frozen base with LoRA needs the
forward (2·N) and the backward with respect to activations only (2·N), no weight gradients:
4·N_base. LoRA parameters take the usual 6·N_lora (a model trained whole, 6·N). Attention adds
12·layers·heads·head_dim·c, where c is the mean number of keys a token attends to (forward
4·h·d·c, backward twice that). Recomputed forwards (rematerialisation) are not counted: this is
MFU, not hardware utilisation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jax_iclemb.errors import BadValue, UserError

WANDB_INSTALL = "pip install 'jax_iclemb[wandb]'"
WANDB_RUN_ID = "wandb_run_id.txt"  # in the workdir: a resumed run continues the same W&B run

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device: jax.Device) -> float:
    """The device's peak bf16 FLOP/s, or 0 when unknown (CPU): MFU is then not reported."""
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)


def flops_per_token(model_config: Any, lora: Any, mean_context: float = 512.0) -> float:
    """Training FLOPs per real token of a frozen-base LoRA model (see the module docstring)."""
    c = model_config
    d, f, n = c.hidden_size, c.intermediate_size, c.num_layers
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = d * (2 * q_dim + 2 * kv_dim) + 3 * d * f
    base = n * per_layer
    shapes = {
        "q_proj": (d, q_dim), "k_proj": (d, kv_dim), "v_proj": (d, kv_dim), "o_proj": (q_dim, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    attention = 12 * n * q_dim * mean_context
    if lora is None:  # every parameter is trained: the usual 6·N
        return 6 * base + attention
    lora_params = n * sum(
        lora.rank * (i + o) for name, (i, o) in shapes.items() if name in lora.targets
    )
    return 4 * base + 6 * lora_params + attention


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill mid-write counts as after any."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The plotted values of a record, by tag: `train/<key>` for its numbers, `<key>/<name>` for
    the entries of its dicts (e.g. {"eval": {"ndcg@10/zero": ...}}); strings and `step` are not."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{name}": v for name, v in value.items()})
        elif isinstance(value, int | float) and key != "step":
            out[f"train/{key}"] = value
    return out


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """Where the W&B run goes and what it is called (the `log.wandb_*` keys)."""

    project: str
    entity: str  # "" = the account's default entity
    name: str  # "" = the workdir's name


def wandb_options(log: ml_collections.ConfigDict) -> WandbOptions | None:
    """The `log.wandb*` keys, or None when W&B is off. Checks that wandb is installed without
    importing it: every process calls this before anything is written, so all stop alike."""
    if not log.wandb:
        return None
    if importlib.util.find_spec("wandb") is None:
        raise BadValue(
            f"log.wandb=True needs the wandb package: {WANDB_INSTALL} "
            "(or turn it off with --config.log.wandb=False)"
        )
    return WandbOptions(log.wandb_project, log.wandb_entity, log.wandb_run_name)


class WandbWriter:
    """One W&B run per workdir: its id is kept in `wandb_run_id.txt` and a resumed run continues
    it (`resume="allow"`). W&B's history only grows, so steps it already holds (logged by a
    killed run after its checkpoint, the same numbers as resume is exact) are not sent again."""

    def __init__(self, workdir: Path, options: WandbOptions, config: dict[str, Any]):
        import wandb

        id_file = workdir / WANDB_RUN_ID
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4))  # before init: a crash in it keeps the id
        try:
            self._run = wandb.init(
                project=options.project,
                entity=options.entity or None,
                name=options.name or workdir.resolve().name,
                id=id_file.read_text().strip(),
                resume="allow",
                dir=workdir,  # its files (and offline runs) stay with the run's
                config=config,
                settings=wandb.Settings(quiet=True),  # no banner or summary around the bar
            )
        except wandb.errors.Error as e:
            raise UserError(
                f"W&B could not start a run: {e}. Log in (`wandb login` or WANDB_API_KEY), "
                "log offline (WANDB_MODE=offline), or turn it off (--config.log.wandb=False)"
            ) from None

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step >= self._run.starting_step:  # below it W&B drops the record, with a warning
            self._run.log(scalars(record), step=step)

    def close(self) -> None:
        self._run.finish()


def _tensorboardx() -> Any:
    """tensorboardX without torch: it imports torch when installed, only to accept torch tensors
    (we log floats), and that import costs seconds at every start of a run."""
    if "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class MetricsWriter:
    """metrics.jsonl + TensorBoard + W&B (with `wandb` options) + a tqdm bar; all no-ops when not
    `enabled` (off process 0), where wandb is not even imported.

    A run resumed at step `initial` first drops what a killed run logged after its checkpoint:
    records past `initial` leave metrics.jsonl, and TensorBoard is told to purge them
    (`purge_step`), so every step is plotted and listed once. `config` (JSON) is logged as text
    to TensorBoard and as the W&B run's config.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool,
        total: int,
        initial: int,
        config: str,
        wandb: WandbOptions | None = None,
    ):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        SummaryWriter = _tensorboardx().SummaryWriter

        workdir = Path(workdir)
        # First, so that W&B's lines come before the bar.
        self._wandb = WandbWriter(workdir, wandb, json.loads(config)) if wandb else None
        metrics = workdir / "metrics.jsonl"
        if metrics.exists():
            kept = [x for x in metrics.read_text().splitlines() if _logged_step(x) <= initial]
            metrics.write_text("".join(f"{x}\n" for x in kept))
        self._file = open(metrics, "a")  # noqa: SIM115
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=initial + 1)
        self._tb.add_text("config", f"```json\n{config}\n```", initial)
        self._bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tag, value in scalars(record).items():
            self._tb.add_scalar(tag, value, record["step"])
        self._tb.flush()  # as metrics.jsonl: a killed run keeps what it logged
        if self._wandb:
            self._wandb.write(record)

    def note(self, message: str) -> None:
        """A line above the progress bar (compiles, for example)."""
        if self.enabled:
            self._bar.write(message, file=sys.stderr)

    def advance(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._bar.set_postfix(
            loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
        )
        self._bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._tb.close()
        self._file.close()
        if self._wandb:
            self._wandb.close()
