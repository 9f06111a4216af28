"""`python -m itsim.train ...` / `accelerate launch -m itsim.train ...`: the `itsim train` command."""
import sys

from itsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
