"""`python -m training ...` is the same as the `genserve` console script."""

from training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
