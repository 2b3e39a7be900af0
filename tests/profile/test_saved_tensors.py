"""Saved-tensor accounting: storages once, views once, parameters never, token dims right."""

from __future__ import annotations

import torch
from torch import nn

from memtrain.profile import profile_model


class SavesTwice(nn.Module):
    """Saves its input twice (x * x) and a view of it; only one storage is kept alive."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        y = x * x  # saves x twice
        z = x.view(-1) * x.view(-1)  # saves views of the same storage
        return (y * self.weight).sum() + z.sum()  # saves y (activation) and weight (parameter)


class Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.saver = SavesTwice(width)

    def forward(self, x):
        return self.saver(self.inner(x))


def _profile(device: str, seq: int = 6, width: int = 5):
    torch.manual_seed(0)
    net = Net(width).to(device)
    x = torch.randn(seq, width, device=device)
    return profile_model(
        net,
        (x,),
        seq=seq,
        loss_fn=lambda out, _: out,
        layers=["inner", "saver"],
        optimizer="sgd",
        target="cpu",
    )


def test_each_storage_counts_once_and_parameters_never():
    result = _profile("cpu")
    saver = result.layer("saver")
    # Saved: x (once, though saved 4 times through views) and y; the weight is a parameter.
    seq, width = 6, 5
    assert saver.saved_bytes == 2 * seq * width * 4
    counted = [t for t in saver.saved_tensors if t.nbytes]
    assert len(counted) == 2
    assert len(saver.saved_tensors) == 5  # x, x, x.view, x.view, y (the weight is excluded)
    assert any(t.is_layer_input for t in saver.saved_tensors)
    # The linear keeps only its input, which is the batch itself: not an activation.
    assert result.layer("inner").saved_bytes == 0
    producers = {t.op for t in saver.saved_tensors}
    assert producers == {"addmm", "mul"}  # x came from the linear, y from x * x


def test_dry_run_equals_cpu_run_for_any_module():
    assert _profile("meta").layer("saver").saved_bytes == _profile("cpu").layer("saver").saved_bytes


def test_token_dims_exact_even_when_sizes_coincide(tmp_path):
    """hidden == seq: only the perturbation probe can tell the token dim from the hidden dim."""
    from memtrain.profile import profile_causal_lm
    from tests.profile.conftest import write_config

    path = write_config(tmp_path, "llama", hidden_size=64, head_dim=16)
    result = profile_causal_lm(str(path), seq=64, dtype="fp32")
    block = result.layer("block.1")
    dims = {tuple(t.shape): t.token_dim for t in block.saved_tensors}
    assert dims[(1, 64, 64)] == 1  # (batch, seq, hidden): tokens on dim 1, not 2
    lse = [t for t in block.saved_tensors if t.dtype == "float32" and len(t.shape) == 3]
    assert lse and all(t.token_dim in (1, 2) for t in lse)
    assert not any("matching sizes" in n for n in result.notes)


def test_fused_attention_is_modelled_not_math():
    """On meta, attention must save O(s) bytes (fused kernel), not the s x s matrix."""
    from memtrain.profile import profile_causal_lm

    short = profile_causal_lm("llama-3.2-1b", seq=1024, dtype="bf16")
    long = profile_causal_lm("llama-3.2-1b", seq=4096, dtype="bf16")
    ratio = long.layer("block.3").saved_bytes / short.layer("block.3").saved_bytes
    assert abs(ratio - 4.0) < 1e-9  # linear in the sequence; math attention would be ~16x
