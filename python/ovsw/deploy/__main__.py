"""``python -m ovsw.deploy bench ...``: measure the engine on this machine;
``python -m ovsw.deploy profile FILE``: each op's time in one network. (A model
trained by ``ovsw-train`` is exported by the application: ``ovsw-export RUN_DIR``.)"""

import sys

USAGE = """usage: python -m ovsw.deploy bench [--threads N ...] [--repeats N]
       python -m ovsw.deploy profile FILE [--batch N] [--threads N] [--size N] [--repeats N]
                                          [--kernel K]
(to export a model trained by ovsw-train: ovsw-export RUN_DIR [-o FILE] [--checkpoint ...])"""

#: What ``python -m ovsw.deploy export`` says now that the command lives in the
#: training application.
MOVED = (
    "python -m ovsw.deploy export is now ovsw-export RUN_DIR "
    "(python -m ovsw.train.export RUN_DIR; needs ovsw[train])"
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from ._bench import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "profile":
        from ._profile import main as profile

        return profile(argv[1:])
    if argv and argv[0] == "export":
        print(MOVED, file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
