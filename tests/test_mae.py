"""MAE (He et al., 2022): masking, loss on masked patches only, normalized-pixel targets, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.methods import build_method
from pretrain.methods.context import StepContext
from pretrain.methods.mae import mae_loss, num_masked_patches, patchify, random_masking
from pretrain.randomness import BatchRandom
from tests.conftest import TINY_MAE


def reference_loss(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool
) -> float:
    """The paper's loss written out sample by sample, patch by patch (no vectorisation)."""
    b, _, h, w = imgs.shape
    total, count = 0.0, 0
    for n in range(b):
        idx = 0
        for gi in range(h // p):
            for gj in range(w // p):
                patch = imgs[n, :, gi * p : (gi + 1) * p, gj * p : (gj + 1) * p].permute(1, 2, 0).reshape(-1)
                if mask[n, idx] == 1:
                    t = patch.double()
                    if norm_pix:
                        mu = t.mean()
                        var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                        t = (t - mu) / math.sqrt(var + 1e-6)
                    total += ((pred[n, idx].double() - t) ** 2).mean().item()
                    count += 1
                idx += 1
    return total / count


@pytest.mark.parametrize("length", [49, 64, 196])
def test_exact_mask_count_and_different_per_sample(length):
    noise = torch.rand(16, length, generator=torch.Generator().manual_seed(0))
    num_masked = num_masked_patches(length, 0.75)
    assert num_masked == round(0.75 * length)
    ids_keep, mask, ids_restore = random_masking(noise, num_masked)
    assert torch.all(mask.sum(1) == num_masked)
    assert ids_keep.shape == (16, length - num_masked)
    assert len({tuple(m.tolist()) for m in mask}) == 16  # every sample masked differently
    # visible indices are exactly the unmasked positions
    for n in range(16):
        assert set(ids_keep[n].tolist()) == set(torch.nonzero(mask[n] == 0).flatten().tolist())
    # ids_restore undoes the shuffle
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(length).expand(16, -1))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference(norm_pix):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 8, 8, generator=g)
    pred = torch.randn(3, 4, 48, generator=g)
    _, mask, _ = random_masking(torch.rand(3, 4, generator=g), 3)
    got = mae_loss(pred, patchify(imgs, 4), mask, norm_pix).item()
    assert got == pytest.approx(reference_loss(imgs, pred, mask, 4, norm_pix), rel=1e-5)


def test_loss_ignores_visible_patches():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(4, 16, 12, generator=g)
    pred = torch.randn(4, 16, 12, generator=g)
    _, mask, _ = random_masking(torch.rand(4, 16, generator=g), 12)
    base = mae_loss(pred, target, mask, True)
    pred_vis = pred + 100.0 * (1 - mask).unsqueeze(-1)  # change only visible patches
    assert torch.equal(mae_loss(pred_vis, target, mask, True), base)
    pred_masked = pred + 1.0 * mask.unsqueeze(-1)
    assert not torch.allclose(mae_loss(pred_masked, target, mask, True), base)


def test_norm_pix_targets_are_per_patch():
    # two patches with different offsets/scales normalise to the same target
    p = 2
    base = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    img = torch.zeros(1, 1, 2, 4)
    img[0, 0, :, :2] = base
    img[0, 0, :, 2:] = 10.0 + 5.0 * base
    target = patchify(img, p)  # [1, 2, 4]
    pred = torch.zeros(1, 2, 4)
    mask = torch.ones(1, 2)
    # with pred = 0 the per-patch loss is mean(t_norm^2) = (n-1)/n * var/(var+eps) for both patches
    per = ((target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()) ** 2
    assert torch.allclose(per[0, 0], per[0, 1], atol=1e-5)
    assert mae_loss(pred, target, mask, True).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_patchify_layout():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    x = patchify(img, 2)
    assert x.shape == (2, 4, 12)
    # patch (0, 1) of sample 1: rows 0-1, cols 2-3, pixel-major then channel
    expected = img[1, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[1, 1], expected)


def _tiny_mae():
    cfg = load_config(TINY_MAE)
    torch.manual_seed(0)
    return build_method(cfg), cfg


def test_forward_and_encoder_sees_visible_tokens_only():
    mae, cfg = _tiny_mae()
    seen = {}
    blk = mae.encoder.blocks[0]

    def hook(module, inputs, output):
        seen.setdefault("shape", inputs[0].shape)

    handle = blk.register_forward_hook(hook)
    imgs = torch.randn(4, 3, 28, 28)
    out = mae({"images": [imgs]}, StepContext.local(BatchRandom(0, 0, 0, 4, torch.device("cpu"))))
    handle.remove()
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    keep = 49 - round(0.75 * 49)
    assert seen["shape"] == (4, 1 + keep, cfg.model.embed_dim)
    out["loss"].backward()
    assert mae.mask_token.grad is not None and mae.decoder_pos_embed.grad is None  # fixed sin-cos


def test_batch_random_is_world_size_invariant():
    full = BatchRandom(3, 5, 0, 8, torch.device("cpu")).rand(8, 49)
    halves = [BatchRandom(3, 5, o, 8, torch.device("cpu")).rand(4, 49) for o in (0, 4)]
    assert torch.equal(torch.cat(halves), full)


def test_param_groups_exclude_norms_biases_tokens():
    mae, _ = _tiny_mae()
    decay, no_decay = mae.param_groups(0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.cls_token" in no_decay_names and "mask_token" in no_decay_names
    assert "encoder.blocks.0.norm1.weight" in no_decay_names and "decoder_embed.bias" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "encoder.pos_embed" not in {names[id(p)] for p in decay["params"] + no_decay["params"]}  # frozen


def test_flops_per_sample_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    mae, _ = _tiny_mae()
    imgs = torch.randn(2, 3, 28, 28)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # the math backend, because FlopCounterMode has no formula for the CPU flash-attention kernel
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = mae({"images": [imgs]}, StepContext.local(BatchRandom(0, 0, 0, 2, torch.device("cpu"))))
        out["loss"].backward()
    measured = counter.get_total_flops() / 2
    assert mae.flops_per_sample() == pytest.approx(measured, rel=0.02)
