#!/usr/bin/env python3
"""Speed benchmark: the same as ``bnrnn bench`` (see bnrnn/bench.py); e.g.

    python scripts/bench.py                       # both paper shapes, CPU or CUDA (auto)
    python scripts/bench.py --shape ptb --reference
"""

import sys

from bnrnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
