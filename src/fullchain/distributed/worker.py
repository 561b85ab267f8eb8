"""One torchrun worker: `python -m fullchain.distributed.worker RUN.yaml [--set K=V ...] [--resume auto|PATH]`.

A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest valid checkpoint
whatever the first launch asked for: that is what makes the restart need no human.
"""

from __future__ import annotations

import argparse
import os
import sys

from fullchain.errors import UserError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fullchain.distributed.worker")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        from fullchain.config import load_config
        from fullchain.pipeline import train_stage

        cfg = load_config(args.config, args.overrides)
        train_stage(cfg, resume="auto" if restarted else args.resume)
    except UserError as exc:
        report(exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
