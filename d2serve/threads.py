"""How many torch threads each heavy step uses, chosen from the cores this process may run on.

``os.cpu_count()`` counts the machine; a process pinned by ``taskset``, a container's cpuset or a batch
scheduler may use fewer cores (``os.sched_getaffinity``), and more torch threads than cores only adds
OpenMP barriers that wait for descheduled threads. Per step:

* ``merge``: row-block workers = the available cores (at most :data:`d2serve.merge_blocks.MAX_ROW_WORKERS`),
  each running torch ops on one thread (no OpenMP barrier per op).
* ``generate`` (verify's greedy generation, bench's decoding): half the available cores, at least 1.
  Decoding a small model is a chain of small ops where the barriers cost more than the second thread
  brings: measured on the 2-core machine, 3 x 32 greedy tokens of SmolLM2 took 9.25 s with 2 threads
  and 7.54 s with 1 (21.3 s with 2 threads and one busy process beside it).
* ``forward`` (batched logits, KL, task scoring, training, export checks): every available core.

An explicit ``--threads N`` (the ``threads`` argument of the API) overrides the choice for every step of
the command; what was used is recorded in each manifest/report (:func:`record`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

STEPS = ("merge", "generate", "forward")


def available_cores() -> int:
    """The number of CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where the
    platform has no affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_requested(threads: int | None) -> int | None:
    """``threads`` as given to a command: None (choose per step) or a positive int.

    Raises:
        InputError: zero or negative.
    """
    from d2serve.errors import InputError

    if threads is None:
        return None
    if int(threads) < 1:
        raise InputError(f"--threads {threads}: expected a positive number of threads (or leave it out to use "
                         f"the {available_cores()} core(s) this process may use)")
    return int(threads)


def pick(step: str, requested: int | None = None) -> int:
    """Torch threads for ``step`` (one of :data:`STEPS`): ``requested`` when given, else the module's rule."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
    requested = check_requested(requested)
    if requested is not None:
        return requested
    cores = available_cores()
    return max(1, cores // 2) if step == "generate" else cores


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def record(requested: int | None, **used: int) -> dict:
    """What a manifest/report records: ``{"requested": N or None, "available_cores": C, <step>: threads, ...}``."""
    return {"requested": requested, "available_cores": available_cores(), **used}
