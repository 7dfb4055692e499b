"""Guidance maths: CFG, CS-CFG (Eq. 16), APG and the permuted null context."""

from __future__ import annotations

import torch

from pickstyle.model.guidance import (
    MomentumBuffer,
    apg_update,
    cfg,
    cs_cfg,
    cs_cfg_apg,
    permute_context,
)


def _preds(seed: int = 0, shape=(1, 4, 3, 4, 6)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def test_cs_cfg_with_zero_context_scale_is_cfg():
    eps_c, eps_t, eps_0 = _preds()
    assert torch.equal(cs_cfg(eps_c, eps_t, eps_0, 5.0, 0.0), cfg(eps_c, eps_t, 5.0))


def test_cs_cfg_is_eq16():
    eps_c, eps_t, eps_0 = _preds(1)
    expected = eps_t + 5.0 * (eps_c - eps_t) + 4.0 * (eps_t - eps_0)
    torch.testing.assert_close(cs_cfg(eps_c, eps_t, eps_0, 5.0, 4.0), expected)
    # the context term matters: a different null prediction gives a different result
    assert not torch.allclose(cs_cfg(eps_c, eps_t, eps_0, 5.0, 4.0), cs_cfg(eps_c, eps_t, eps_c, 5.0, 4.0))


def test_cfg_scale_one_is_conditional():
    eps_c, eps_t, _ = _preds(2)
    torch.testing.assert_close(cfg(eps_c, eps_t, 1.0), eps_c)


def test_momentum_buffer_accumulates():
    buf = MomentumBuffer(0.75)
    a, b = torch.ones(2), torch.full((2,), 2.0)
    buf.update(a)
    torch.testing.assert_close(buf.update(b), b + 0.75 * a)


def test_apg_update_is_orthogonal_and_clipped():
    eps_c, eps_t, _ = _preds(3)
    diff = 100.0 * (eps_c - eps_t)
    update = apg_update(diff, eps_c, buffer=None, norm_threshold=55.0)
    dims = list(range(1, update.ndim))
    inner = (update.double() * eps_c.double()).sum(dims)
    assert float(inner.abs().max()) < 1e-6 * float(update.norm() * eps_c.norm())
    assert float(update.norm()) <= 55.0 + 1e-3  # projection never grows the clipped norm
    # without clipping and with eta = 1 nothing is removed
    torch.testing.assert_close(apg_update(diff, eps_c, None, norm_threshold=0.0, eta=1.0), diff)


def test_cs_cfg_apg_scales_one_is_conditional():
    eps_c, eps_t, eps_0 = _preds(4)
    out = cs_cfg_apg(eps_c, eps_t, eps_0, 1.0, 1.0, MomentumBuffer(), MomentumBuffer())
    torch.testing.assert_close(out, eps_c)
    out = cs_cfg_apg(eps_c, eps_t, eps_0, 5.0, 4.0, MomentumBuffer(), MomentumBuffer())
    assert torch.isfinite(out).all() and not torch.allclose(out, eps_c)


def test_permute_context_keeps_values_but_changes_layout():
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 96, 5, 4, 6, generator=g)
    perm = permute_context(context, torch.Generator().manual_seed(1))
    assert perm.shape == context.shape
    assert not torch.equal(perm, context)
    # same multiset of values per channel (only the f, h, w axes move)
    for c in (0, 17, 95):
        assert torch.equal(perm[0, c].flatten().sort().values, context[0, c].flatten().sort().values)
    # axes permuted independently: each frame of the output is some frame of the input with rows/cols moved
    frame_sums = sorted(context[0].sum(dim=(0, 2, 3)).tolist())
    torch.testing.assert_close(
        torch.tensor(sorted(perm[0].sum(dim=(0, 2, 3)).tolist())), torch.tensor(frame_sums)
    )


def test_permute_context_is_reproducible_per_generator():
    context = torch.arange(2 * 5 * 4 * 6, dtype=torch.float32).reshape(1, 2, 5, 4, 6)
    a = permute_context(context, torch.Generator().manual_seed(7))
    b = permute_context(context, torch.Generator().manual_seed(7))
    c = permute_context(context, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator drawn twice gives a fresh permutation (redrawn every step)
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(permute_context(context, g), permute_context(context, g))
