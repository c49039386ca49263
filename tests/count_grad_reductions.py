"""`msft_fast.train` (as torchrun runs it) with each optimizer step's gradient reductions counted on
this rank, written to $COUNT_DIR/rank-$RANK.json:
[{units, reduce_scatters, all_reduces, fsdp_units, micro_batches}] per step."""
import json
import os
import sys

from torch.distributed.fsdp import FSDPModule

from msft_fast.cli import main
from msft_fast.training.step_audit import GradientReductions
from msft_fast.training.trainer import Trainer

steps = []
_train_step = Trainer.train_step


def counted_train_step(self):
    c = self.counters
    micro_batches = len(self.loader.step_batches(c.epoch, c.step_in_epoch))  # an epoch's last step may have fewer
    with GradientReductions() as counted:
        _train_step(self)
    steps.append({"units": counted.units, "reduce_scatters": counted.reduce_scatters,
                  "all_reduces": counted.all_reduces,
                  "fsdp_units": sum(isinstance(m, FSDPModule) for m in self.model.modules()),
                  "micro_batches": micro_batches})


if __name__ == "__main__":
    Trainer.train_step = counted_train_step
    try:
        code = main(["train", *sys.argv[1:]])
    finally:
        with open(os.path.join(os.environ["COUNT_DIR"], f"rank-{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(steps, f)
    sys.exit(code)
