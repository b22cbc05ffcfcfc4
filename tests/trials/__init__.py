"""Pass/fail trial harnesses: kill trials (``tests.trials.kill``) and corruption trials (``tests.trials.corruption``).

The tests run small campaigns of them; run them by hand, from the repository root, for full ones:
``.venv/bin/python -m tests.trials.kill --help`` and ``.venv/bin/python -m tests.trials.corruption --help``.
"""
