"""How fast a save or load went, in the one format every checkpoint log line uses."""


def rate(nbytes: int, seconds: float) -> str:
    """``'1.234 GB in 0.567 s (2.18 GB/s)'``."""
    return f"{nbytes / 1e9:.3f} GB in {seconds:.3f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
