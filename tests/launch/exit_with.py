"""A stand-in training module for torchrun: ``python -m tests.launch.exit_with train CODE`` exits with CODE."""

import sys

if __name__ == "__main__":
    raise SystemExit(int(sys.argv[-1]))
