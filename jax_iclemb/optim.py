"""Optimizer and learning-rate schedule: clip by global norm, then AdamW, optionally accumulated.

The schedule follows Hugging Face's `get_linear_schedule_with_warmup` /
`get_cosine_schedule_with_warmup` (what the reference trainer uses): the learning rate of update
number `n` (0-based, counted in optimizer updates, not micro-steps) is `lr * n / warmup_steps`
during warm-up, so the very first update runs at 0, exactly as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_iclemb.config import DECAYS, OPTIM_DEFAULTS

Schedule = Callable[[jax.Array | int], jax.Array]

# For logging grad_norm: the same norm `clip_by_global_norm` uses.
global_norm = optax.tree.norm


def _resolve(optim_config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with `optim_config`; unknown keys and bad values raise."""
    given = dict(optim_config)
    unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown optim config keys {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
    cfg = {**OPTIM_DEFAULTS, **given}
    if cfg["decay"] not in DECAYS:
        raise ValueError(f"optim.decay must be one of {DECAYS}, got {cfg['decay']!r}")
    if cfg["lr"] <= 0 or cfg["warmup_steps"] < 0:
        raise ValueError(f"optim.lr must be > 0 and optim.warmup_steps >= 0, got {cfg}")
    if not 0.0 <= cfg["end_lr_ratio"] <= 1.0:
        raise ValueError(f"optim.end_lr_ratio must be in [0, 1], got {cfg['end_lr_ratio']}")
    if int(cfg["accumulate_steps"]) < 1:
        raise ValueError(f"optim.accumulate_steps must be >= 1, got {cfg['accumulate_steps']}")
    return cfg


def make_schedule(
    lr: float, warmup_steps: int, total_steps: int, decay: str, end_lr_ratio: float = 0.0
) -> Schedule:
    """Linear warm-up 0 -> lr, then decay to `end_lr_ratio * lr` at `total_steps` (held after)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = step / max(1, warmup_steps)
        progress = jnp.clip((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        if decay == "linear":
            shape = 1.0 - progress
        elif decay == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            shape = jnp.ones_like(progress)
        after = end_lr_ratio + (1.0 - end_lr_ratio) * shape  # constant: shape 1 -> lr
        return lr * jnp.where(step < warmup_steps, warm, after)

    return schedule


def make_optimizer(
    optim_config: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """(clip -> AdamW, accumulated over `accumulate_steps` micro-steps, schedule).

    `total_steps` counts optimizer updates. With accumulation, the wrapped transformation averages
    the micro-step gradients and applies clip + AdamW to the mean on every k-th call (zero updates
    in between); the schedule advances once per real update. `grad_clip <= 0` disables clipping.
    """
    cfg = _resolve(optim_config)
    schedule = make_schedule(
        cfg["lr"], int(cfg["warmup_steps"]), total_steps, cfg["decay"], cfg["end_lr_ratio"]
    )
    adamw = optax.adamw(
        schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"]
    )
    clip = cfg["grad_clip"]
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip and clip > 0 else adamw
    k = int(cfg["accumulate_steps"])
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule
