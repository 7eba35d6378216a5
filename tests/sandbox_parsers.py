"""Module-level parsers for the sandbox tests (spawned children import them by name)."""

import time


def fine(x: int) -> int:
    return x * 2


def hog_memory(_: int) -> int:
    blob = bytearray(4 << 30)  # 4 GiB, over the test's cap
    return len(blob)


def hang(_: int) -> int:
    time.sleep(60)
    return 0


def crash(_: int) -> int:
    import os

    os._exit(3)


def raise_value_error(_: int) -> int:
    raise ValueError("corrupted header")


def crash_on_negative(x: int) -> int:
    """Kills its whole process on a negative item: the chunk's other items must still come back."""
    import os

    if x < 0:
        os._exit(3)
    if x == 0:
        raise ValueError("zero is refused")
    return x * 2


def mixed_answer(x: int) -> dict:
    import numpy as np

    return {"frame": np.ones((2, 2)), "mask": None, "n": x}
