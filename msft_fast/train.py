"""`torchrun --nproc_per_node N -m msft_fast.train --config FILE.yaml [key=value ...]`: one worker.

`msft-fast launch --nproc_per_node N --config FILE.yaml ...` runs the same workers with the exit
codes that `msft-fast train` documents (see msft_fast/runtime/launch.py)."""
import sys

from msft_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
