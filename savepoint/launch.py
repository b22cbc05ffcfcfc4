"""torchrun, minus the launcher's own traceback when a worker fails.

``python -m savepoint.launch <torchrun args>`` is exactly ``torchrun <torchrun args>``, except that
a worker failure ends with one summary line and the worker's exit code: the worker has already
printed its own one-line error, and torchrun's traceback would only bury it.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        print(f"savepoint: rank {rank} failed with exit code {failure.exitcode}; its error is above "
              f"(rerun with SAVEPOINT_DEBUG=1 for a traceback)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
