"""Print what the model sees at a training step, one JSON object per line.

    python -m jax_iclemb.data.preview --config configs/tiny.py --step 3 [--config.data.x=...]

The first line summarises the step (dataset, epoch, utilisation, ...); then one line per query with
its full text (in-context examples included), its passages and their token counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jax_iclemb.config import load_config
from jax_iclemb.data.pipeline import pipeline_from_config
from jax_iclemb.errors import add_debug_flag, cli


@cli
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_iclemb.data.preview", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="a config file, or a recipe name from configs/ (e.g. tiny)"
    )
    parser.add_argument("--step", type=int, required=True, help="global training step")
    add_debug_flag(parser)
    args, overrides = parser.parse_known_args(argv)
    if args.step < 0:
        parser.error(f"--step must be >= 0, got {args.step}")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(
            f"unrecognised arguments: {' '.join(bad)} (overrides look like --config.KEY=VALUE)"
        )
    config = load_config(args.config, overrides)
    pipe = pipeline_from_config(config)
    _, info = pipe.batch(args.step)
    print(json.dumps({"kind": "step", **info}, ensure_ascii=False))
    for row in pipe.examples(args.step):
        print(json.dumps({"kind": "query", **row}, ensure_ascii=False))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
