"""Repeat launches of one compiled Triton kernel without Triton's per-call argument handling.

A chunked backward launches the same kernel hundreds of times per step with only a few integer
arguments changing. Triton's entry point (``kernel[grid](...)``) binds and specializes every
argument and looks the compiled kernel up on each call: 47.5 µs of host time per launch of the
logits-gradient kernel on an H200's host, against 27 µs through :class:`RepeatLaunch` (17.6 in
the compiled kernel's launcher itself; measured 2026-12-04, docs/benchmarks.md).
:class:`RepeatLaunch` makes the first launch of each ``key`` through the entry point (which
compiles) and the later ones straight through the launcher.

The caller's ``key`` must fix everything Triton specializes on: constexpr values, launch
options, dtypes, pointer alignment and the integers it does not exempt with
``do_not_specialize``. Launch hooks (profilers that instrument Triton launches) and anything
that is not a compiled kernel (the CPU interpreter) always take the entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import triton

# Off: every launch takes Triton's entry point (comparisons, or a Triton whose launcher's
# calling convention differs).
ENABLED = True
# Launches so far, by path (benchmarks read it to see that the direct path is taken).
LAUNCH_COUNTS = {"entry": 0, "direct": 0}


def current_stream_getter() -> Callable[[], int]:
    """A function returning the raw stream Triton's own entry point would launch on
    (PyTorch's current one), with the driver looked up once."""
    driver = triton.runtime.driver.active
    get_device, get_stream = driver.get_current_device, driver.get_current_stream
    return lambda: get_stream(get_device())


def _hooks_active() -> bool:
    """Whether anything listens to Triton's launches (a hook chain with members, or a plain
    hook on older Triton); unknown counts as yes."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:
        return True
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class RepeatLaunch:
    """Launches of one ``@triton.jit`` kernel, compiled kernels kept per caller key.

    Calls pass every parameter positionally in the kernel's order, constexprs included (what
    the compiled kernel's launcher takes), and launch options (``num_warps``, ``num_stages``)
    by name.
    """

    def __init__(self, kernel, stream: Callable[[], int] | None = None) -> None:
        self.kernel = kernel
        self.stream = stream
        self.compiled: dict[Hashable, object] = {}
        self.broken = False

    def __call__(self, key: Hashable, grid: tuple[int, int, int], args: Sequence, options: dict):
        compiled = self.compiled.get(key) if ENABLED and not self.broken else None
        if compiled is None or _hooks_active():
            result = self._entry(grid, args, options)
            compiled_kernel = hasattr(result, "packed_metadata") and hasattr(result, "function")
            if ENABLED and not self.broken and compiled_kernel:
                self.compiled[key] = result
            return
        if self.stream is None:
            self.stream = current_stream_getter()
        try:
            compiled.run(
                *grid, self.stream(), compiled.function, compiled.packed_metadata, None, None,
                None, *args,
            )  # fmt: skip
        except TypeError:
            # A Triton whose launcher takes other arguments refuses them before launching:
            # this launcher takes the entry point from now on.
            self.compiled.clear()
            self.broken = True
            self._entry(grid, args, options)
            return
        LAUNCH_COUNTS["direct"] += 1

    def _entry(self, grid: tuple[int, int, int], args: Sequence, options: dict):
        """One launch through Triton's entry point; returns what it returns (the compiled
        kernel, or None in the interpreter)."""
        LAUNCH_COUNTS["entry"] += 1
        return self.kernel[grid](*args, **options)

    def clear(self) -> None:
        self.compiled.clear()
