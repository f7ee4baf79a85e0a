""""The PyTorch way": the reference FlagEmbedding ICL trainer's step, for throughput comparison.

    python bench/torch_reference.py --config configs/tiny.py [--steps 4] [--warmup 1] \
        [--config.KEY=VALUE ...]

A `transformers` MistralModel (random init from the config's architecture) with `peft` LoRA (same
rank, alpha, dropout and targets), fed left-padded per-batch tensors (queries padded to the longest
query of the batch, passages to the longest passage), queries and passages encoded separately,
last-token pooling, L2 normalisation, InfoNCE at τ over in-batch + hard negatives (or the own group
only), AdamW with gradient clipping 1.0, fp32 on the CPU (or `--device cuda`: the GPU, with
PyTorch's default full-precision fp32 matmuls; each step ends with a synchronize). It consumes
exactly the token sequences of jax_iclemb's pipeline: each step's ids are read back from the
`PackedBatch` (`unpack`). Prints one JSON line of measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jax_iclemb.data.batch import PackedBatch


def unpack(batch: PackedBatch) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(query ids [B], passage ids [B][<=G]) back out of a packed batch, in slot order."""
    s = batch.max_segments

    def ids(slot: int) -> list[int]:
        row, seg = divmod(int(slot), s)
        return batch.tokens[row][batch.segment_ids[row] == seg + 1].tolist()

    queries = [ids(q) for q in batch.query_slot]
    passages = [
        [ids(p) for p, real in zip(slots, mask) if real]
        for slots, mask in zip(batch.passage_slot, batch.passage_mask)
    ]
    return queries, passages


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, longest], padded on the left as the reference does."""
    longest = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, longest - len(x) :] = torch.tensor(x)
        mask[i, longest - len(x) :] = 1
    return ids, mask


def build_model(arch: dict[str, Any], lora: Any, seed: int) -> torch.nn.Module:
    """A random-initialised MistralModel with PEFT LoRA adapters on `lora.targets`."""
    import peft
    import transformers

    torch.manual_seed(seed)
    fields = {k: v for k, v in arch.items() if k not in ("model_type", "architectures")}
    config = transformers.MistralConfig(**fields)
    model = transformers.MistralModel(config).float()
    lora_config = peft.LoraConfig(
        r=int(lora.rank),
        lora_alpha=float(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=list(lora.targets),
    )
    return peft.get_peft_model(model, lora_config)


def encode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last-token pooling (left padding: the last column) and L2 normalisation."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return F.normalize(hidden[:, -1], dim=-1)


def contrastive_loss(
    q: torch.Tensor, p: torch.Tensor, group_sizes: list[int], in_batch: bool, temperature: float
) -> torch.Tensor:
    """InfoNCE; `p` holds every query's group, positive first, concatenated."""
    starts = np.cumsum([0, *group_sizes[:-1]])
    if in_batch:
        scores = q @ p.T / temperature
        return F.cross_entropy(scores, torch.as_tensor(starts, dtype=torch.long, device=q.device))
    losses = []
    for i, (start, size) in enumerate(zip(starts, group_sizes)):
        scores = p[start : start + size] @ q[i] / temperature
        losses.append(-F.log_softmax(scores, dim=-1)[0])
    return torch.stack(losses).mean()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run(config: Any, steps: int, warmup: int, device: str = "cpu") -> dict[str, Any]:
    """Train `warmup + steps` steps on the pipeline's batches; time the last `steps`."""
    from jax_iclemb.data.pipeline import pipeline_from_config

    torch.set_num_threads(os.cpu_count() or 1)
    pipeline = pipeline_from_config(config)
    model = build_model(config.model.arch.to_dict() | {"vocab_size": max(
        int(config.model.arch.vocab_size), len(pipeline.tokenizer))}, config.lora, config.seed)
    model.to(device).train()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(config.optim.lr), weight_decay=0.0)
    rss_start = current_rss_mb()
    temperature = float(config.loss.temperature)
    times, real, slots, losses = [], 0, 0, []
    for step in range(warmup + steps):
        batch, _ = pipeline.batch(step)
        queries, passages = unpack(batch)
        q_ids, q_mask = (x.to(device) for x in left_pad(queries))
        p_ids, p_mask = (x.to(device) for x in left_pad([p for group in passages for p in group]))
        sync()
        t0 = time.perf_counter()
        q = encode(model, q_ids, q_mask)
        p = encode(model, p_ids, p_mask)
        loss = contrastive_loss(
            q, p, [len(g) for g in passages], bool(batch.in_batch_negatives), temperature
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(config.optim.grad_clip))
        optimizer.step()
        sync()
        seconds = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step >= warmup:
            times.append(seconds)
            real += int(q_mask.sum() + p_mask.sum())
            slots += q_ids.numel() + p_ids.numel()
    return {
        "side": "torch",
        "steps": steps,
        "warmup": warmup,
        "real_tokens": real,
        "tokens_per_s": real / sum(times),
        "step_s": float(np.mean(times)),
        "step_times": times,
        "utilisation": real / slots,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_training_mb": rss_start,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    from jax_iclemb import config as config_lib

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    args, overrides = parser.parse_known_args(argv)
    config = config_lib.load_config(args.config, overrides)
    print(json.dumps(run(config, args.steps, args.warmup, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
