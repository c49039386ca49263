import sys

from msft_fast.cli import main

sys.exit(main())
