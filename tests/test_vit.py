"""Unit tests of the ViT (parity with timm as the reference), sin-cos position embeddings and FLOP counts."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import Block, VisionTransformer, create_vit, get_2d_sincos_pos_embed, list_vits
from pretrain.models.flops import (
    attention_matmul_flops,
    training_flops,
    transformer_block_flops,
    vit_encoder_flops,
)
from tests.components import require_module

# Small enough for 2 CPU cores: 32 px images, 4x4 grid of 8 px patches.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4)


def tiny_vit(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16", **{**TINY, **overrides})


def images(batch: int = 2, size: int = 32, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def timm():
    """timm (a pinned dev dependency): the reference implementation the parity tests compare with."""
    return require_module("timm", "pip install -r requirements.txt")


def timm_twin(model: VisionTransformer, **timm_kwargs) -> torch.nn.Module:
    """timm's VisionTransformer of the same configuration with our weights loaded strictly."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ref = TimmViT(**timm_kwargs)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


# ------------------------------------------------------------------------------------------ timm parity
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_state_dict_loads_strict_into_timm_and_outputs_match(timm, pos_embed: str) -> None:
    model = tiny_vit(pos_embed=pos_embed).eval()
    ref = timm_twin(model, **TINY, num_classes=0)
    assert set(model.state_dict()) == set(ref.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    assert model(x).shape == (2, 32)


def test_timm_parity_with_head_and_no_qkv_bias(timm) -> None:
    model = tiny_vit(num_classes=5, qkv_bias=False, in_chans=1).eval()
    ref = timm_twin(model, **TINY, num_classes=5, qkv_bias=False, in_chans=1)
    x = images(chans=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # [B, D]
        ref_pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
    assert model(x).shape == (2, 5)


def test_timm_parity_at_registry_size(timm) -> None:
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16", depth=2).eval()  # 224 px, 16 px patches, 192 wide, 3 heads
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    assert set(model.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(model.state_dict(), strict=True)
    x = images(batch=1, size=224)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list_vits())
def test_registry_matches_timm_layout(timm, name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        ours = create_vit(name)
        ref = timm.create_model(f"{name}_224", pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert ours.img_size == (224, 224)
    assert ours.num_patches == ours.grid_size[0] * ours.grid_size[1] == (224 // ours.patch_size) ** 2


def test_properties_and_no_weight_decay() -> None:
    model = tiny_vit()
    assert (model.num_patches, model.embed_dim, model.patch_size, model.grid_size) == (16, 32, 8, (4, 4))
    assert model.cls_token.shape == (1, 1, 32)
    assert model.pos_embed.shape == (1, 17, 32)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} and model.no_weight_decay() <= set(names)


def test_init_like_timm() -> None:
    model = create_vit("vit_small_patch16", depth=1)
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(qkv.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.count_nonzero(model.norm.bias) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert 0 < model.cls_token.abs().max().item() < 1e-4


# -------------------------------------------------------------------------------------- MAE entry points
def test_forward_features_equals_forward_tokens_of_embed_patches() -> None:
    model = tiny_vit().eval()
    x = images()
    with torch.no_grad():
        patches = model.embed_patches(x)  # [B, L, D]
        assert patches.shape == (2, 16, 32)
        torch.testing.assert_close(model.forward_tokens(patches), model.forward_features(x), atol=0, rtol=0)
        visible = patches[:, [0, 5, 9, 15]]  # an MAE-style subset
        assert model.forward_tokens(visible).shape == (2, 5, 32)


def test_get_intermediate_layers() -> None:
    model = tiny_vit().eval()
    x = images()
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=2)
        assert len(outs) == 2 and all(o.shape == (2, 17, 32) for o in outs)
        torch.testing.assert_close(outs[-1], model.forward_features(x))
        torch.testing.assert_close(model.get_intermediate_layers(x, n=[-2])[0], outs[0])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=4)


def test_other_resolution_interpolates_patch_pos_embed() -> None:
    model = tiny_vit().eval()
    with torch.no_grad():
        assert model.forward_features(images(size=16)).shape == (2, 1 + 4, 32)  # DINO-style small crop
        assert model.forward_features(images(size=48)).shape == (2, 1 + 36, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(images(size=30))


# --------------------------------------------------------------------------------- checkpointing / drop
def test_grad_checkpointing_same_output_and_grads() -> None:
    x = images()
    results = []
    for enable in (False, True):
        model = tiny_vit(drop_path_rate=0.2).train()  # drop path on: checkpointing must replay its RNG
        model.set_grad_checkpointing(enable)
        torch.manual_seed(123)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_drop_path_rates_are_linear_over_depth() -> None:
    model = tiny_vit(depth=5, drop_path_rate=0.4)
    rates = [b.drop_path1.p for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_drop_path_identity_in_eval_random_but_seeded_in_train() -> None:
    model = tiny_vit(drop_path_rate=0.5)
    plain = tiny_vit(drop_path_rate=0.0)
    plain.load_state_dict(model.state_dict())
    x = images(batch=8)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
        model.train()
        torch.manual_seed(7)
        a = model(x)
        torch.manual_seed(7)
        b = model(x)
        c = model(x)  # RNG moved on
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, plain(x))
    assert not torch.allclose(a, c)


def test_block_standalone_for_decoder() -> None:
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, mlp_ratio=2.0, qkv_bias=False, drop_path=0.1, norm_eps=1e-5)
    assert block.attn.qkv.bias is None and block.mlp.fc1.out_features == 32 and block.norm1.eps == 1e-5
    assert block(torch.randn(2, 7, 16)).shape == (2, 7, 16)


# -------------------------------------------------------------------------------------------- sin-cos
def test_sincos_hand_computed() -> None:
    # D = 8: each axis gets 4 channels = 2 frequencies, w = 1 / 10000 ** (k / 2) = (1, 1/100).
    # Patch (r, c) in row-major order -> [sin c, sin c/100, cos c, cos c/100, sin r, sin r/100, cos r, cos r/100].
    table = get_2d_sincos_pos_embed(8, (2, 3), cls_token=True)
    assert table.shape == (1 + 6, 8) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0  # class position

    def expected(r: int, c: int) -> list[float]:
        s, co = math.sin, math.cos
        return [s(c), s(c / 100), co(c), co(c / 100), s(r), s(r / 100), co(r), co(r / 100)]

    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(table[1 + r * 3 + c], torch.tensor(expected(r, c)))
    assert get_2d_sincos_pos_embed(8, 4).shape == (16, 8)
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(6, 2)


def test_sincos_pos_embed_is_fixed() -> None:
    model = tiny_vit(pos_embed="sincos")
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4, cls_token=True))
    model(images()).sum().backward()
    assert model.pos_embed.grad is None
    assert tiny_vit(pos_embed="learned").pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------- FLOPs
def _tiny_analytic(num_tokens: int = 17) -> int:
    return vit_encoder_flops(num_tokens, dim=32, depth=3, mlp_ratio=4.0, patch_size=8, in_chans=3)


def test_flops_match_flop_counter_with_math_sdpa() -> None:
    # The math SDPA backend decomposes attention into bmm, which FlopCounterMode counts.
    model, batch = tiny_vit().eval(), 2
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_features(images(batch))
    assert counter.get_total_flops() == pytest.approx(batch * _tiny_analytic(), rel=0.02)


def test_flops_default_cpu_sdpa_is_not_counted_by_flop_counter() -> None:
    # Like with like: on CPU the fused SDPA kernel has no flop formula (torch <= 2.14), so compare the
    # counter with our count minus the attention products; if a future torch counts it, compare in full.
    model, batch = tiny_vit().eval(), 2
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(images(batch))
    counted_ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    expected = batch * _tiny_analytic()
    if not any("attention" in op or "bmm" in op for op in counted_ops):
        expected -= batch * 3 * attention_matmul_flops(17, 32)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


def test_flops_vit_large_matches_counter_and_reference() -> None:
    with torch.device("meta"):  # shapes only: ViT-L/16 at 224 costs nothing to count here
        model = create_vit("vit_large_patch16")
        x = torch.empty(1, 3, 224, 224)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_features(x)
    analytic = vit_encoder_flops(197, 1024, 24, patch_size=16)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)
    # ViT-L/16 at 224: ~123 GFLOP forward (2 per multiply-add; timm's tables list MACs)
    assert analytic / 1e9 == pytest.approx(123.1, abs=0.1)
    assert training_flops(analytic) == 3 * analytic


def test_flops_block_formula() -> None:
    n, d = 10, 8
    per_block = 2 * n * (3 * d * d + d * d + 2 * 4 * d * d) + 4 * n * n * d
    assert transformer_block_flops(n, d, 4.0) == per_block
    # MAE: embed all 196 patches, encode 49 visible + class token.
    mae = vit_encoder_flops(50, 1024, 24, patch_size=16, num_embedded_patches=196)
    assert mae == 2 * 196 * 768 * 1024 + 24 * transformer_block_flops(50, 1024)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_name_names_the_nearest() -> None:
    with pytest.raises(ValueError, match="did you mean 'vit_small_patch16'") as err:
        create_vit("vit_smal_patch16")
    assert all(name in str(err.value) for name in list_vits())
    with pytest.raises(ValueError, match="did you mean 'drop_path_rate'"):
        create_vit("vit_tiny_patch16", drop_path=0.1)


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_vit("vit_tiny_patch16", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="pos_embed"):
        create_vit("vit_tiny_patch16", pos_embed="rope")
