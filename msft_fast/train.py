"""`torchrun --nproc_per_node N -m msft_fast.train --config FILE.yaml [key=value ...]`"""
import sys

from msft_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
