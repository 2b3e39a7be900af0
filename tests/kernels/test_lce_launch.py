"""The repeat-launch path of the Triton kernels: which launches take Triton's entry point and
which go straight to the compiled kernel, with what arguments. A stand-in kernel records the
calls (the real launcher needs a GPU; the device benchmark checks the gradients there)."""

from __future__ import annotations

import pytest
import triton

from memtrain.kernels.cross_entropy import triton_launch
from memtrain.kernels.cross_entropy.triton_launch import RepeatLaunch


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.function = "fn-handle"
        self.packed_metadata = "meta"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeKernel:
    """Records entry-point launches; returns a compiled kernel (or None, like the
    interpreter)."""

    def __init__(self, compiles=True):
        self.log = []
        self.compiles = compiles

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.log.append(("entry", grid, args, options))
            return FakeCompiled(self.log) if self.compiles else None

        return launch


def _launcher(kernel):
    return RepeatLaunch(kernel, stream=lambda: 77)


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch):
    """Each test counts launches from zero."""
    monkeypatch.setattr(triton_launch, "LAUNCH_COUNTS", {"entry": 0, "direct": 0})


def test_first_launch_compiles_then_direct():
    kernel = FakeKernel()
    launch = _launcher(kernel)
    launch("k", (5, 1, 1), ("X", 10, 64), {"num_warps": 4})
    launch("k", (6, 2, 1), ("X", 11, 64), {"num_warps": 4})
    assert kernel.log[0] == ("entry", (5, 1, 1), ("X", 10, 64), {"num_warps": 4})
    # the grid, the stream, the kernel's handle and metadata, no hooks, then the parameters
    direct = ("direct", (6, 2, 1, 77, "fn-handle", "meta", None, None, None, "X", 11, 64))
    assert kernel.log[1] == direct
    assert triton_launch.LAUNCH_COUNTS == {"entry": 1, "direct": 1}


def test_new_key_goes_through_entry_point_again():
    kernel = FakeKernel()
    launch = _launcher(kernel)
    launch("a", (1, 1, 1), (0, 1, 8), {})
    launch("b", (1, 1, 1), (0, 1, 16), {})
    launch("a", (1, 1, 1), (0, 2, 8), {})
    assert [entry[0] for entry in kernel.log] == ["entry", "entry", "direct"]


def test_no_compiled_kernel_means_entry_point_every_time():
    kernel = FakeKernel(compiles=False)
    launch = _launcher(kernel)
    for n in range(3):
        launch("k", (1, 1, 1), (0, n, 8), {})
    assert [entry[0] for entry in kernel.log] == ["entry"] * 3
    assert triton_launch.LAUNCH_COUNTS == {"entry": 3, "direct": 0}


def test_disabled_and_cleared(monkeypatch):
    kernel = FakeKernel()
    launch = _launcher(kernel)
    launch("k", (1, 1, 1), (0, 1, 8), {})
    launch.clear()
    launch("k", (1, 1, 1), (0, 1, 8), {})
    monkeypatch.setattr(triton_launch, "ENABLED", False)
    launch("k", (1, 1, 1), (0, 1, 8), {})
    assert [entry[0] for entry in kernel.log] == ["entry"] * 3


@pytest.mark.skipif(not hasattr(triton, "knobs"), reason="this Triton has no launch hooks knob")
def test_launch_hooks_take_entry_point(monkeypatch):
    kernel = FakeKernel()
    launch = _launcher(kernel)
    launch("k", (1, 1, 1), (0, 1, 8), {})
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    launch("k", (1, 1, 1), (0, 1, 8), {})
    assert [entry[0] for entry in kernel.log] == ["entry", "entry"]


def test_descriptor_settings_follow_kernel_parameter_order():
    """The logits-gradient kernel takes its constexprs positionally: the settings tuple must
    name them in the kernel's order, and the "pdl" variant must set the launch option."""
    import inspect

    import torch

    from memtrain.kernels.cross_entropy import triton_tma
    from memtrain.kernels.cross_entropy.triton_function import _config

    kernel = triton_tma._grad_logits_tma_kernel
    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters.values()
    constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
    h = torch.zeros(64, 32, dtype=torch.bfloat16)
    w = torch.zeros(96, 32, dtype=torch.bfloat16)
    config = dict(_config(16, 32, 16, 4, 2, "ieee", upcast=True), flat=True, pdl=True)
    desc = triton_tma.Descriptors(h, w, config)
    constexprs, options = desc.settings(config, has_bias=True, has_softcap=False)
    values = dict(zip(constexpr_names, constexprs, strict=True))
    assert values == {
        "HAS_BIAS": True, "HAS_SOFTCAP": False, "BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_D": 16,
        "UPCAST": True, "TMA_STORE": False, "PDL": True, "FLAT": True, "FLATTEN": False,
        "WARP_SPECIALIZE": False,
    }  # fmt: skip
    assert options == {"num_warps": 4, "num_stages": 2, "launch_pdl": True}
    plain = dict(config, pdl=False)
    assert "launch_pdl" not in desc.settings(plain, False, False)[1]


def test_launcher_that_refuses_the_arguments_falls_back_for_good():
    class Refusing(FakeCompiled):
        def run(self, *args):
            raise TypeError("launcher takes other arguments")

    class Kernel(FakeKernel):
        def __getitem__(self, grid):
            def launch(*args, **options):
                self.log.append(("entry", grid, args, options))
                return Refusing(self.log)

            return launch

    kernel = Kernel()
    launch = _launcher(kernel)
    for n in range(4):
        launch("k", (1, 1, 1), (0, n, 8), {})
    # first compiles, second tries the launcher, is refused and relaunches; then entry only
    assert [entry[0] for entry in kernel.log] == ["entry"] * 4
    assert [entry[2][1] for entry in kernel.log] == [0, 1, 2, 3]
    assert launch.broken and triton_launch.LAUNCH_COUNTS == {"entry": 4, "direct": 0}
