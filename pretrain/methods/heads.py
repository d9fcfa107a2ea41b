"""Heads that self-supervised methods put on top of the backbone: projection MLPs, weight-normalised
prototype layers and DINO's head.

Several methods share these pieces (DINO and iBOT use :class:`DINOHead`; MoCo v3, BYOL, SimSiam,
Barlow Twins and VICReg use projection/prediction MLPs that :func:`mlp` builds with their own
normalisation and activation), so they live once, beside the method contract, and each method file
only chooses their sizes.

FSDP2 note: a head is a good sharding unit of its own (``Method.shard_units``): everything it
computes happens inside its ``forward``, so the parameters are gathered exactly while it runs. That
is also why :class:`WeightNormLinear` keeps weight normalisation as two plain parameters instead of
``torch.nn.utils.parametrizations.weight_norm`` (whose parametrisation objects and cached weights
do not survive per-parameter sharding and DCP's state-dict flattening unchanged).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear", "mlp", "trunc_normal_init_"]


def trunc_normal_init_(module: nn.Module, std: float = 0.02) -> None:
    """Linear layers: weight ~ truncated normal (std ``std``, absolute bounds [-2, 2]), bias 0.

    The initialisation of DINO's ``DINOHead._init_weights`` (and of timm/DeiT's ViT), meant for
    ``nn.Module.apply``; other modules are left as they are.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    *,
    activation: Callable[[], nn.Module] = nn.GELU,
    norm: Callable[[int], nn.Module] | None = None,
    bias: bool = True,
    last_bias: bool = True,
    last_norm: nn.Module | None = None,
) -> nn.Sequential:
    """``num_layers`` Linear layers, ``[Linear -> norm -> activation] x (num_layers - 1) -> Linear``.

    With ``num_layers == 1`` it is one ``Linear(in_dim, out_dim)`` (DINO's ``nlayers=1``).

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: Linear layers (>= 1).
        activation: activation after each hidden layer (DINO/iBOT: GELU; MoCo v3/BYOL/SimSiam: ReLU).
        norm: normalisation after each hidden Linear, e.g. ``nn.BatchNorm1d`` (None: none, as DINO).
        bias: bias on the hidden Linear layers (MoCo v3 and Barlow Twins drop it before a BatchNorm).
        last_bias: bias on the output Linear.
        last_norm: a module appended after the output Linear (MoCo v3/SimSiam: affine-free BatchNorm).

    Raises:
        ValueError: ``num_layers < 1`` or a non-positive width.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers}")
    if min(in_dim, hidden_dim, out_dim) < 1:
        raise ValueError(f"MLP widths must be >= 1, got in={in_dim}, hidden={hidden_dim}, out={out_dim}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(width, hidden_dim, bias=bias))
        if norm is not None:
            layers.append(norm(hidden_dim))
        layers.append(activation())
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim, bias=last_bias))
    if last_norm is not None:
        layers.append(last_norm)
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """A bias-free Linear layer with weight normalisation (Salimans & Kingma, 2016), ``W = g * V / ||V||``.

    Each output row ``W_i = g_i * V_i / ||V_i||_2``: the same maths and the same parameter names and
    shapes as ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` (``weight_v [out, in]``,
    ``weight_g [out, 1]``), so DINO's released heads load by name. ``fix_norm=True`` is DINO's
    ``norm_last_layer``: ``g`` is fixed to 1 (a parameter with ``requires_grad=False``), so every
    prototype has unit norm and the logits are cosine similarities.

    Initialisation as DINO's ``DINOHead``: ``V`` keeps ``nn.Linear``'s default (Kaiming-uniform,
    ``a = sqrt(5)``: the head's trunc-normal init runs before DINO creates the last layer) and
    ``g = 1``.

    Args:
        in_features: input width.
        out_features: output width (DINO: the number of prototypes, 65,536).
        fix_norm: keep ``g`` at 1 (not trained).
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``V``: ``nn.Linear``'s default initialisation; ``g``: 1."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g.fill_(1.0)

    def weight(self) -> Tensor:
        """The effective weight ``g * V / ||V||`` (row norms in float32), ``[out, in]``."""
        v = self.weight_v
        norms = torch.linalg.vector_norm(v.float(), dim=1, keepdim=True)  # [out, 1]
        return v * (self.weight_g.float() / norms).to(v.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fix_norm={not self.weight_g.requires_grad}"
        )


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al., 2021, §3.1 and Appendix; ``DINOHead`` of facebookresearch/dino).

    ``MLP (num_layers Linear, GELU between, no BatchNorm) -> L2 normalisation -> weight-normalised
    Linear without bias to out_dim``. Paper defaults: 3 layers, hidden 2048, bottleneck 256,
    out_dim 65,536, ``norm_last_layer=True``.

    ``forward`` returns the logits and the L2-normalised bottleneck features (the latter for collapse
    monitoring, at no extra cost), both computed inside the one ``forward`` that FSDP2 hooks.

    Args:
        in_dim: backbone feature width.
        out_dim: output dimension K (prototypes).
        hidden_dim: MLP hidden width.
        bottleneck_dim: MLP output width, before the L2 normalisation.
        num_layers: Linear layers of the MLP (>= 1).
        norm_last_layer: fix the last layer's weight-norm magnitude ``g`` to 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, activation=nn.GELU)
        self.mlp.apply(trunc_normal_init_)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.hidden_dim, self.bottleneck_dim, self.num_layers = hidden_dim, bottleneck_dim, num_layers

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[N, in_dim]`` -> (logits ``[N, out_dim]``, normalised bottleneck ``[N, bottleneck_dim]``)."""
        z = F.normalize(self.mlp(x), dim=-1, p=2)  # [N, bottleneck]
        return self.last_layer(z), z

    def forward_flops(self) -> int:
        """Forward FLOPs of one feature vector (2 per multiply-add; matrix products only)."""
        widths = [self.in_dim, *([self.hidden_dim] * (self.num_layers - 1)), self.bottleneck_dim]
        mlp_flops = sum(2 * a * b for a, b in itertools.pairwise(widths))
        return mlp_flops + 2 * self.bottleneck_dim * self.out_dim
