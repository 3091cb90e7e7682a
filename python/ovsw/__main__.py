"""``python -m ovsw``: which command does what. The library runs nothing of the training
application (:mod:`ovsw.train`); this only names the entry points and exits with 2."""

import sys

USAGE = """usage: ovsw-train ...                        train, evaluate, resume (upstream's main.py)
       python -m ovsw.train ...              the same as ovsw-train (torchrun -m ovsw.train)
       ovsw-sweep ... / ovsw-experiment ...  the application's sweeps and the paper's experiment
       python -m ovsw.deploy bench ...       the deploy engine against PyTorch on this CPU
       python -m ovsw.analysis plot ...      figures of a run's flip records
       python -m ovsw.cuda check             the fused CUDA route checked on this machine"""


def main() -> int:
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
