"""Meta kernels for ops whose stock meta function checks what only the GPU kernel needs.

``torch._grouped_mm`` (the experts of Hugging Face mixture-of-experts models) has a meta
function that refuses float32 inputs and unaligned strides, because the CUDA kernel does; the
CPU kernel takes them. A dry run only needs the output's shape and dtype, so while it runs this
registers a meta kernel that gives exactly that, and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def _grouped_mm_meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)


@contextlib.contextmanager
def shape_only_meta_kernels() -> Iterator[None]:
    """Within: ``aten::_grouped_mm`` on meta tensors of any dtype and layout."""
    library = None
    if hasattr(torch.ops.aten, "_grouped_mm"):
        try:
            from torch._meta_registrations import _create_grouped_mm_output_tensor  # noqa: F401
        except ImportError:  # an older torch: its own meta kernel stays
            pass
        else:
            with warnings.catch_warnings():  # "overriding a previously registered kernel"
                warnings.simplefilter("ignore")
                library = torch.library.Library("aten", "IMPL")
                try:
                    library.impl("_grouped_mm", _grouped_mm_meta, "Meta")
                except RuntimeError:  # torch 2.11: its meta kernel is Python's and stays
                    library._destroy()
                    library = None
    try:
        yield
    finally:
        if library is not None:
            library._destroy()
