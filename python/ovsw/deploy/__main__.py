"""``python -m ovsw.deploy {bench,export} ...``: measure the engine on this machine, or
export a model trained by ``ovsw-train``."""

import sys

USAGE = """usage: python -m ovsw.deploy bench [--threads N ...] [--repeats N]
       python -m ovsw.deploy export RUN_DIR [-o FILE] [--checkpoint best|last|PATH]"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from ._bench import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "export":
        from ._run import main as export

        return export(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
