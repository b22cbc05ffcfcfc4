import sys

from savepoint.cli import main

# Guarded: async_with_pinned_mem's writer process starts with multiprocessing "spawn", which
# imports this module again under another name.
if __name__ == "__main__":
    sys.exit(main())
