"""`msft-fast` command line: `train` a config, `launch` it on several ranks (torchrun with the
documented exit codes), write the built-in `demo-data`, `report` on a run, `compare` runs."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

from msft_fast.errors import Interrupted, StopRequested, UserError, signal_exit_code

# A rank other than 0 that shares an error with every rank stays quiet and waits this long before
# it exits, so that rank 0 has printed the one line before torchrun stops the group.
QUIET_RANK_GRACE_S = 2.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # every torchrun flag passes through: argparse must not see them
        from msft_fast.runtime.launch import main as launch_main

        return launch_main(argv[1:])
    parser = argparse.ArgumentParser(prog="msft-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train with a YAML config plus dotted key=value overrides")
    tr.add_argument("--config", help="YAML config file")
    tr.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds a run")
    tr.add_argument("overrides", nargs="*", metavar="key.path=value")
    sub.add_parser("launch", help="train on several ranks: msft-fast launch [torchrun options] --config FILE.yaml "
                                  "[key=value ...]; exit codes 2 (bad input), 130 (SIGINT), 143 (SIGTERM)")
    demo = sub.add_parser("demo-data", help="write the built-in synthetic multi-task mixture")
    demo.add_argument("out_dir", nargs="?", default="data/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--variant", choices=("calibrated", "compact"), default="calibrated",
                      help="calibrated: the `make demo` mixture; compact: the small one the tests use")
    rep = sub.add_parser("report", help="rewrite curves.png and report.md of an output folder from its history.json")
    rep.add_argument("output_dir")
    cmp_ = sub.add_parser("compare", help="print a markdown table comparing runs (their output folders)")
    cmp_.add_argument("dirs", nargs="+", metavar="OUTPUT_DIR")
    # Flags may come anywhere among the overrides (`train --config c.yaml out=x --overwrite method=sft`):
    # argparse ends the overrides at the first flag, so what it leaves over joins them, in order.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    _quiet_third_party()
    try:
        if args.command == "demo-data":
            from msft_fast.demo_data import write_demo_mixture

            entries = write_demo_mixture(args.out_dir, seed=args.seed, variant=args.variant)
            print(f"demo mixture ({args.variant}, {len(entries)} tasks) in {args.out_dir}")
            return 0
        if args.command == "report":
            from msft_fast.report import write_report

            print("\n".join(write_report(args.output_dir)))
            return 0
        if args.command == "compare":
            from msft_fast.report import compare

            print(compare(args.dirs))
            return 0
        from msft_fast.config import load_config
        from msft_fast.run import train

        try:
            cfg, config_error = load_config(args.config, args.overrides), None
        except UserError as e:
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                raise
            # Under torchrun every rank reads the config: the ranks agree on the error first (in
            # train), so that rank 0 alone prints it, once.
            cfg, config_error = None, e
        train(cfg, overwrite=args.overwrite, config_error=config_error)
        return 0
    except UserError as e:
        # Errors that all ranks agreed on (see run._agreed) are printed once, by rank 0; any other
        # is printed by the rank that hit it, so a failure on a far node is never silent.
        if rank == 0:
            print(f"msft-fast: error: {e}", file=sys.stderr, flush=True)
        elif not getattr(e, "all_ranks", False):
            print(f"msft-fast: error: [rank {rank}] {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(QUIET_RANK_GRACE_S)
        return 2
    except StopRequested as e:  # a stop signal, handled after a checkpoint (see run._stop_on_signals)
        if rank == 0:
            print(f"msft-fast: {e}", file=sys.stderr, flush=True)
        return signal_exit_code(e.signal_name)
    except (Interrupted, KeyboardInterrupt) as e:  # before training, or a second signal
        if rank == 0:
            print(f"msft-fast: {str(e) or 'interrupted'}", file=sys.stderr, flush=True)
        return signal_exit_code(getattr(e, "signal_name", "SIGINT"))


def _quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("datasets", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; our own bar tracks steps


if __name__ == "__main__":
    sys.exit(main())
