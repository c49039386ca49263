"""Several `msft_fast.train` runs one after another in the same torchrun workers (each run joins and
leaves the process group), so a test pays the workers' start-up once:

    torchrun ... tests/train_runs.py --config C.yaml ++ output_dir=A method=ies ++ output_dir=B method=dynamix

Each run's optimizer steps have their gradient reductions counted on each rank, as
tests/count_grad_reductions.py does, into OUTPUT_DIR/reductions-rank-$RANK.json."""
import json
import os
import sys

import count_grad_reductions as counting

from msft_fast.cli import main
from msft_fast.training.trainer import Trainer

if __name__ == "__main__":
    Trainer.train_step = counting.counted_train_step
    groups = [[]]
    for arg in sys.argv[1:]:
        groups.append([]) if arg == "++" else groups[-1].append(arg)
    common, *runs = groups
    code = 0
    for run in runs:
        args = [*common, *run]
        out = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
        counting.steps.clear()
        code = main(["train", *args])
        with open(os.path.join(out, f"reductions-rank-{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(counting.steps, f)
        if code:
            break
    sys.exit(code)
