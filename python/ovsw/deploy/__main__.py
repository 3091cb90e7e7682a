"""``python -m ovsw.deploy bench``: measure the deploy engine on this machine."""

import sys

from ._bench import main as bench_main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "bench":
        print("usage: python -m ovsw.deploy bench [--threads N ...] [--repeats N]", file=sys.stderr)
        return 2
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
