"""Deploy engine vs PyTorch (issue 4): binary 3x3 layers of ResNet18_1w1a, whole models,
file size. Run by hand: ``python benchmarks/bench_deploy.py [--threads 1 2]``.

The measurement lives in :mod:`ovsw.deploy._bench` (also ``python -m ovsw.deploy
bench``); the last line printed is a JSON object with binary3x3_speedup_min,
binary3x3_speedup_median, model_speedup, max_rel_err and size_ratio.
"""

import sys

from ovsw.deploy._bench import main

if __name__ == "__main__":
    sys.exit(main())
