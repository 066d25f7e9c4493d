"""`python -m m1.cli ...`: the m1 command (as `python -m m1`)."""

from m1.cli import main

if __name__ == "__main__":
    main()
