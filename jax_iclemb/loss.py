"""Contrastive (InfoNCE) loss over the global batch, with optional teacher distillation.

One code path serves every mode: scores are always computed against all B·G passages and a mask
decides which of them count. `in_batch_negatives` is a traced boolean, so switching between
datasets with and without in-batch negatives never recompiles. Written over the *global* batch
inside `jax.jit`, the loss is the cross-device loss: XLA inserts the all-gather of passages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def _check_shapes(q, p, passage_mask, teacher_scores, has_teacher, negative_mask) -> None:
    if q.ndim != 2 or p.ndim != 3:
        raise ValueError(f"q must be [B, D] and p [B, G, D]; got q{q.shape}, p{p.shape}")
    b, g, d = p.shape
    expected = {
        "q": (q.shape, (b, d)),
        "passage_mask": (passage_mask.shape, (b, g)),
        "teacher_scores": (None if teacher_scores is None else teacher_scores.shape, (b, g)),
        "has_teacher": (None if has_teacher is None else has_teacher.shape, (b,)),
        "negative_mask": (None if negative_mask is None else negative_mask.shape, (b, b * g)),
    }
    for name, (got, want) in expected.items():
        if got is not None and tuple(got) != want:
            raise ValueError(
                f"{name} has shape {tuple(got)}, expected {want} for p of shape {tuple(p.shape)}"
            )


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _soft_cross_entropy(
    student_logits: jax.Array, teacher_scores: jax.Array, mask: jax.Array
) -> jax.Array:
    """Per-row -Σ softmax(teacher) · log_softmax(student), both over the slots in `mask`.

    Every row of `mask` must hold at least one True slot (no all -inf softmax).
    """
    teacher = jax.nn.softmax(jnp.where(mask, teacher_scores, -jnp.inf), axis=-1)
    teacher = jax.lax.stop_gradient(teacher)  # a fixed target, as in the reference
    log_student = jax.nn.log_softmax(jnp.where(mask, student_logits, -jnp.inf), axis=-1)
    # Zero the -inf of unused slots before multiplying (0 * -inf is NaN).
    return -jnp.sum(teacher * jnp.where(mask, log_student, 0.0), axis=-1)


def contrastive_loss(
    q: jax.Array,
    p: jax.Array,
    passage_mask: jax.Array,
    in_batch_negatives: jax.Array | bool,
    *,
    temperature: float,
    teacher_scores: jax.Array | None = None,
    has_teacher: jax.Array | None = None,
    distill_weight: float = 0.0,
    negative_mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE of each query against its positive `p[i, 0]`, mean over queries.

    q [B, D], p [B, G, D]: L2-normalised embeddings of the global batch. passage_mask [B, G]: False
    marks unused slots; a query whose positive slot is unused is padding and carries no weight.
    in_batch_negatives (bool scalar, may be traced): True scores each query against all valid
    passages of the batch, False against its own group only. negative_mask [B, B·G] (optional):
    True drops that passage as a negative of that query (never the query's own positive).
    teacher_scores [B, G] / has_teacher [B] (optional): adds `distill_weight` times the soft
    cross-entropy between softmax(teacher scores) and the student's own-group distribution at τ,
    averaged over the queries that have a teacher.

    Returns (loss, metrics) with metrics: contrastive_loss, distill_loss, accuracy, positive_score
    and hardest_negative_score (cosine similarities, not divided by τ).
    """
    _check_shapes(q, p, passage_mask, teacher_scores, has_teacher, negative_mask)
    b, g, d = p.shape
    q = q.astype(jnp.float32)
    p = p.astype(jnp.float32)
    passage_mask = passage_mask.astype(bool)
    query_valid = passage_mask[:, 0]

    sims = q @ p.reshape(b * g, d).T  # [B, B·G] cosine similarities
    column = jnp.arange(b * g)
    row = jnp.arange(b)
    target = row * g
    is_target = column[None, :] == target[:, None]
    own_group = (column // g)[None, :] == row[:, None]

    candidate = passage_mask.reshape(1, b * g) & (own_group | jnp.asarray(in_batch_negatives))
    if negative_mask is not None:
        candidate &= ~negative_mask.astype(bool) | is_target
    # Padding queries keep only their target column: their loss is exactly 0 and nothing is NaN.
    candidate = jnp.where(query_valid[:, None], candidate, is_target)

    logits = jnp.where(candidate, sims / temperature, -jnp.inf)
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    per_query = jax.nn.logsumexp(logits, axis=-1) - target_logit
    contrastive = _masked_mean(per_query, query_valid)

    if teacher_scores is None:
        distill = jnp.zeros((), jnp.float32)
    else:
        own_logits = jnp.einsum("bd,bgd->bg", q, p) / temperature
        first_slot = jnp.arange(g)[None, :] == 0
        group_mask = jnp.where(query_valid[:, None], passage_mask, first_slot)
        per_query_kd = _soft_cross_entropy(
            own_logits, teacher_scores.astype(jnp.float32), group_mask
        )
        teacher_rows = (
            query_valid if has_teacher is None else query_valid & jnp.asarray(has_teacher, bool)
        )
        distill = _masked_mean(per_query_kd, teacher_rows)

    negative = candidate & ~is_target
    has_negative = query_valid & jnp.any(negative, axis=-1)
    hardest = jnp.max(jnp.where(negative, sims, -jnp.inf), axis=-1)
    metrics = {
        "contrastive_loss": contrastive,
        "distill_loss": distill,
        "accuracy": _masked_mean(jnp.argmax(logits, axis=-1) == target, query_valid),
        "positive_score": _masked_mean(jnp.sum(jnp.where(is_target, sims, 0.0), -1), query_valid),
        "hardest_negative_score": _masked_mean(jnp.where(has_negative, hardest, 0.0), has_negative),
    }
    return contrastive + distill_weight * distill, metrics
