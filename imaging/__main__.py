import sys

from .cli import main

# Guarded: a multiprocessing "spawn" child (the pipeline's source hash) imports this module too.
if __name__ == "__main__":
    sys.exit(main())
