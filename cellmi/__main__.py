"""``python -m cellmi <job>``; also ``torchrun -m cellmi train``."""

from cellmi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
