"""`python -m m1 ...` (and `torchrun ... -m m1 quantize ...`): the m1 command."""

from m1.cli import main

if __name__ == "__main__":
    main()
