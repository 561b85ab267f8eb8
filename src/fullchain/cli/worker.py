"""One torchrun worker: `python -m fullchain.cli.worker RUN.yaml [--set K=V ...] [--resume auto|PATH]
[--allow-fresh]`.

A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest valid checkpoint
whatever the first launch asked for: that is what makes the restart need no human. When checkpoints exist and
none verifies, it starts from step 0 only where the first launch would have (a fresh launch, or --allow-fresh).
"""

from __future__ import annotations

import argparse
import os
import sys

from fullchain.errors import UserError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fullchain.cli.worker")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", default=None)
    parser.add_argument("--allow-fresh", action="store_true")
    args = parser.parse_args(argv)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        from fullchain.config import load_config
        from fullchain.stages.train import train_stage

        cfg = load_config(args.config, args.overrides)
        train_stage(cfg, resume="auto" if restarted else args.resume,
                    allow_fresh=args.allow_fresh or not args.resume)
    except UserError as exc:
        report(exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
