"""`python -m nanovllm.serve MODEL ...` is `nanovllm serve MODEL ...`."""
import sys

from nanovllm.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
