"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021, arXiv:2104.14294).

A student ViT with the DINO head is trained to match a teacher of the same architecture on different
views of an image. The teacher is an exponential moving average of the student (momentum 0.996 -> 1 on a
cosine schedule) and sees only the global crops; the student sees every crop (multi-crop: 2 x 224 + N x 96
px). The teacher's outputs are centered (a running mean of its outputs, momentum 0.9, averaged over all
ranks) and sharpened (temperature 0.04, optionally warmed up from a lower value), which together avoid
collapse; the loss is the cross-entropy between the teacher's and the student's (temperature 0.1)
distributions over K = 65,536 dimensions, for every (teacher global crop, other student crop) pair,
averaged over pairs (Algorithm 1 and §3.1).

The implementation follows the authors' code (facebookresearch/dino: main_dino.py, utils.py,
vision_transformer.py) wherever the paper is silent: the head (:class:`~pretrain.methods.heads.DINOHead`),
the parameter groups (``utils.get_params_groups``), the per-epoch teacher-temperature schedule,
``cancel_gradients_last_layer`` and the initialisation. Values and their sources: configs/dino/*.yaml.

Beyond the reference (which has neither): under gradient accumulation the loss of every micro-batch uses
the center as it was at the start of the step and the center is updated once per step from the teacher
outputs of all micro-batches and ranks, so accumulation equals one big batch; the teacher and student
blocks are sharded identically (FSDP2) and the EMA runs on each rank's own shards.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipelines.augment import ViewSpec, dino_views
from pretrain.export import vit_backbone_meta
from pretrain.methods import register_method
from pretrain.methods.base import Method, MethodConfigBase
from pretrain.methods.context import RunInfo, StepContext
from pretrain.methods.heads import DINOHead
from pretrain.models import create_vit, vit_kwargs
from pretrain.models.flops import vit_encoder_flops
from pretrain.precision import full_precision
from pretrain.schedules import cosine

__all__ = [
    "DINO",
    "DINOConfig",
    "MultiCropNet",
    "center_update",
    "dino_loss",
    "teacher_temp_schedule",
]


@dataclass
class DINOConfig(MethodConfigBase):
    """DINO's knobs; defaults are the authors' (main_dino.py ``get_args_parser``)."""

    name: str = "dino"
    # head (vision_transformer.py DINOHead; main_dino.py --out_dim, --norm_last_layer)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    # teacher and loss (main_dino.py --momentum_teacher, --warmup_teacher_temp, --teacher_temp,
    # --warmup_teacher_temp_epochs; DINOLoss student_temp=0.1, center_momentum=0.9)
    momentum_teacher: float = 0.996
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    # main_dino.py --freeze_last_layer 1 (epochs); a fraction of an epoch is allowed for short runs
    freeze_last_layer_epochs: float = 1.0
    # multi-crop (main_dino.py --global_crops_scale, --local_crops_number, --local_crops_scale;
    # DataAugmentationDINO: local crops of 96 px). Global crops are model.img_size.
    global_crops: int = 2
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops: int = 8
    local_crop_size: int = 96
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # utils.GaussianBlur(radius_min=0.1, radius_max=2.0): sigma in pixels of the resized crop
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])

    @staticmethod
    def validate(cfg: Any) -> list[str]:
        """Errors naming each key: sizes, temperatures, momenta, crops and epochs DINO cannot train with."""
        m = cfg.method
        errors: list[str] = []
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if m[key] < 1:
                errors.append(f"method.{key}={m[key]} must be >= 1")
        if m.out_dim < m.bottleneck_dim:
            errors.append(
                f"method.out_dim={m.out_dim} must be >= method.bottleneck_dim={m.bottleneck_dim}: the "
                "last layer maps the bottleneck to more prototypes (DINO: 256 -> 65536)"
            )
        for key in ("momentum_teacher", "center_momentum"):
            if not 0.0 <= m[key] <= 1.0:
                errors.append(f"method.{key}={m[key]} must be in [0, 1]")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if m[key] <= 0:
                errors.append(f"method.{key}={m[key]} must be > 0")
        for key in ("teacher_temp", "warmup_teacher_temp"):
            if m[key] > m.student_temp:
                errors.append(
                    f"method.{key}={m[key]} is above method.student_temp={m.student_temp}: the teacher "
                    "must sharpen (a lower temperature than the student's; DINO: 0.04-0.07 vs 0.1)"
                )
        for key in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if m[key] < 0:
                errors.append(f"method.{key}={m[key]} must be >= 0 (epochs)")
        if m.global_crops not in (1, 2):
            errors.append(
                f"method.global_crops={m.global_crops} must be 1 or 2: the teacher sees the global crops "
                "(DINO: 2, the two global views of DataAugmentationDINO)"
            )
        if m.local_crops < 0:
            errors.append(f"method.local_crops={m.local_crops} must be >= 0")
        elif m.global_crops == 1 and m.local_crops == 0:
            errors.append(
                "method.global_crops=1 with method.local_crops=0 leaves no (teacher crop, other student "
                "crop) pair to train on: use 2 global crops or add local crops"
            )
        patch = _patch_size(cfg)
        if m.local_crops > 0 and patch is not None and (m.local_crop_size < 1 or m.local_crop_size % patch):
            errors.append(
                f"method.local_crop_size={m.local_crop_size} must be a positive multiple of the patch size "
                f"{patch} (model.patch_size); global crops are model.img_size={cfg.model.img_size}"
            )
        for key in ("global_crops_scale", "local_crops_scale"):
            scale = list(m[key])
            if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
                errors.append(f"method.{key}={scale} must be [low, high] with 0 < low <= high <= 1")
        sigma = list(m.blur_sigma)
        if not (len(sigma) == 2 and 0 < sigma[0] <= sigma[1]):
            errors.append(f"method.blur_sigma={sigma} must be [low, high] with 0 < low <= high (pixels)")
        return errors


def _patch_size(cfg: Any) -> int | None:
    if cfg.model.patch_size is not None:
        return int(cfg.model.patch_size)
    from pretrain.models import vit_architecture

    try:
        return int(vit_architecture(cfg.model.name)["patch_size"])
    except ValueError:  # unknown model.name: reported by the model checks
        return None


# ---- the maths, as pure functions ----------------------------------------------------------------
def dino_loss(student_out: Tensor, teacher_probs: Tensor, student_temp: float, num_crops: int) -> Tensor:
    """DINO's loss (Caron et al., 2021, Algorithm 1; ``DINOLoss.forward`` of the authors' code).

    ``mean over pairs (q, v), v != q, of mean over samples of H(P_t(q), P_s(v))`` with
    ``P_s(v) = softmax(s_v / student_temp)``: every student crop against every teacher (global) crop,
    except the student's view of the same crop.

    Args:
        student_out: student logits of every crop, crop-major ``[num_crops * B, K]`` (globals first).
        teacher_probs: centered and sharpened teacher distributions of the global crops,
            ``[num_global * B, K]`` (:func:`teacher_distribution`), no gradient.
        student_temp: student temperature (0.1).
        num_crops: crops the student saw (global + local).

    Returns:
        The scalar loss (float32 for float32 inputs).
    """
    log_p = F.log_softmax(student_out / student_temp, dim=-1).chunk(num_crops)  # num_crops x [B, K]
    targets = teacher_probs.detach().chunk(teacher_probs.shape[0] // log_p[0].shape[0])
    total, terms = student_out.new_zeros(()), 0
    for iq, q in enumerate(targets):
        for v, lp in enumerate(log_p):
            if v == iq:  # the student's view of the teacher's own crop
                continue
            total = total + torch.sum(-q * lp, dim=-1).mean()
            terms += 1
    return total / terms


def teacher_distribution(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - center) / teacher_temp)``: centering and sharpening (§3.1, "Avoiding collapse")."""
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


def center_update(center: Tensor, teacher_sum: Tensor, count: float, momentum: float) -> Tensor:
    """``c <- m c + (1 - m) * (1 / B) sum_i g_t(x_i)`` (§3.1, eq. 4), from the sum over ``count`` outputs."""
    return center * momentum + (teacher_sum / count) * (1 - momentum)


def teacher_temp_schedule(warmup_temp: float, final_temp: float, warmup_epochs: int) -> list[float]:
    """Per-epoch teacher temperatures of the warmup: ``np.linspace(warmup, final, warmup_epochs)``.

    As ``DINOLoss.teacher_temp_schedule``: the temperature is constant within an epoch, linear over the
    first ``warmup_epochs`` epochs (reaching ``final_temp`` in the last of them), then ``final_temp``.
    """
    return [float(t) for t in np.linspace(warmup_temp, final_temp, warmup_epochs)]


def _resolution_groups(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """``[(start, end)]`` runs of consecutive crops with the same spatial size."""
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropNet(nn.Module):
    """Backbone + head over crops of several resolutions (DINO's ``MultiCropWrapper``).

    Consecutive crops of the same size are concatenated into one backbone forward (two forwards for
    2 x 224 + N x 96), the class tokens (after the final norm) of all crops go through the head at once.

    Args:
        backbone: the ViT.
        head: maps ``[N, D]`` features to ``(logits [N, K], normalised bottleneck [N, d])``.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Crops (each ``[B, C, H, W]``) -> (logits ``[len(crops) * B, K]`` crop-major, bottleneck)."""
        feats = []
        for start, end in _resolution_groups(crops):
            x = torch.cat(list(crops[start:end])) if end - start > 1 else crops[start]
            feats.append(self.backbone.forward_features(x)[:, 0])  # [n * B, D] class tokens
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


@register_method("dino", config=DINOConfig)
class DINO(Method):
    """Student/teacher self-distillation around timm-layout ViTs (Caron et al., 2021)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        mcfg, model_cfg = cfg.method, cfg.model
        # drop_path_rate is the student's; the teacher runs in eval mode
        backbone = create_vit(model_cfg.name, **vit_kwargs(model_cfg))
        # DINO's vision_transformer.py: class token trunc-normal(0.02) (timm's default is normal(1e-6));
        # the rest of timm's init is DINO's (trunc-normal(0.02) Linear, zero biases, LayerNorm 1/0).
        nn.init.trunc_normal_(backbone.cls_token, std=0.02)
        if model_cfg.grad_checkpointing:
            backbone.set_grad_checkpointing(True)
        head = DINOHead(
            backbone.embed_dim,
            int(mcfg.out_dim),
            hidden_dim=int(mcfg.hidden_dim),
            bottleneck_dim=int(mcfg.bottleneck_dim),
            num_layers=int(mcfg.head_layers),
            norm_last_layer=bool(mcfg.norm_last_layer),
        )
        self.student = MultiCropNet(backbone, head)
        # main_dino.py: the teacher starts as a copy of the student and never receives gradients.
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False).eval()
        # The running mean of the teacher's outputs (DINOLoss.center): checkpointed with the model.
        self.register_buffer("center", torch.zeros(1, int(mcfg.out_dim)))

        self.model_name = model_cfg.name
        self.num_global, self.num_local = int(mcfg.global_crops), int(mcfg.local_crops)
        self.num_crops = self.num_global + self.num_local
        self.global_size, self.local_size = int(model_cfg.img_size), int(mcfg.local_crop_size)
        self.global_scale = (float(mcfg.global_crops_scale[0]), float(mcfg.global_crops_scale[1]))
        self.local_scale = (float(mcfg.local_crops_scale[0]), float(mcfg.local_crops_scale[1]))
        self.blur_sigma = (float(mcfg.blur_sigma[0]), float(mcfg.blur_sigma[1]))
        self.student_temp = float(mcfg.student_temp)
        self.teacher_temp = float(mcfg.teacher_temp)
        self.warmup_teacher_temp = float(mcfg.warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = int(mcfg.warmup_teacher_temp_epochs)
        self.center_momentum = float(mcfg.center_momentum)
        self.momentum_teacher = float(mcfg.momentum_teacher)
        self.freeze_last_layer_epochs = float(mcfg.freeze_last_layer_epochs)
        # Set by configure(): the run's horizon and epoch length.
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.freeze_last_layer_steps = 0
        self._temps = teacher_temp_schedule(
            self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs
        )
        # Teacher outputs summed over this step's micro-batches (reset when the center is updated).
        self._center_sum: Tensor | None = None
        self._center_count = 0

    # ---- schedules -----------------------------------------------------------------------------
    def configure(self, run: RunInfo) -> None:
        """Convert the recipe's epochs to steps: teacher-temperature warmup and last-layer freeze."""
        self.total_steps = run.total_steps
        self.freeze_last_layer_steps = run.epochs_to_steps(
            self.freeze_last_layer_epochs, "method.freeze_last_layer_epochs"
        )
        run.epochs_to_steps(self.warmup_teacher_temp_epochs, "method.warmup_teacher_temp_epochs")
        self.steps_per_epoch = run.steps_per_epoch

    def teacher_temp_at(self, step: int) -> float:
        """Teacher temperature of ``step``: DINO's per-epoch schedule (epoch = step // steps per epoch)."""
        if not self._temps:
            return self.teacher_temp
        if self.steps_per_epoch is None:
            raise RuntimeError(
                "DINO.configure(run) must be called before training (teacher temperature warmup)"
            )
        epoch = step // self.steps_per_epoch
        return self._temps[epoch] if epoch < len(self._temps) else self.teacher_temp

    def momentum_at(self, step: int) -> float:
        """Teacher EMA momentum after ``step``: cosine from ``momentum_teacher`` to 1 over the run
        (``utils.cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep)[step]``)."""
        if self.total_steps is None:
            raise RuntimeError("DINO.configure(run) must be called before training (teacher momentum)")
        return cosine(step, self.total_steps, self.momentum_teacher, 1.0)

    def last_layer_frozen(self, step: int) -> bool:
        """Whether ``step`` is inside the first ``freeze_last_layer_epochs`` (no update of the last layer)."""
        return step < self.freeze_last_layer_steps

    # ---- contract with the trainer -------------------------------------------------------------
    def views(self) -> list[ViewSpec]:
        """DataAugmentationDINO: global crops at ``model.img_size``, then the local crops."""
        views = dino_views(
            self.global_size,
            self.local_size,
            self.num_local,
            self.global_scale,
            self.local_scale,
            blur_sigma=self.blur_sigma,
        )
        return views[: self.num_global] + views[2:]

    def shard_units(self) -> list[nn.Module]:
        # Student and teacher the same way: ema_ then works on local shards without communication.
        return [
            *self.student.backbone.blocks,
            self.student.head,
            *self.teacher.backbone.blocks,
            self.teacher.head,
        ]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor | float]:
        crops = batch["images"]
        if len(crops) != self.num_crops:
            raise ValueError(
                f"DINO expects {self.num_crops} views per sample ({self.num_global} global + "
                f"{self.num_local} local), got {len(crops)}"
            )
        with torch.no_grad():
            t_logits, t_z = self.teacher(crops[: self.num_global])  # [G*B, K]: globals only
        s_logits, s_z = self.student(crops)  # [V*B, K]
        temp = self.teacher_temp_at(ctx.step)
        with full_precision(s_logits):
            t = t_logits.float()
            targets = teacher_distribution(t, self.center, temp)  # the center as at the start of the step
            loss = dino_loss(s_logits.float(), targets, self.student_temp, self.num_crops)
            with torch.no_grad():
                self._accumulate_center(t)
                log_q = F.log_softmax((t - self.center) / temp, dim=-1)
                entropy = -(targets * log_q).sum(dim=-1).mean()  # nats; 0 = one-hot, ln K = uniform
                metrics = {
                    "teacher_temp": temp,
                    "momentum": self.momentum_at(ctx.step),
                    "teacher_entropy": entropy,
                    "kl": loss.detach() - entropy,  # mean KL(P_t || P_s) over the loss's pairs
                    "student_std": s_z.float().std(dim=0, correction=0).mean(),  # per-dim std; 0 = collapse
                    "teacher_std": t_z.float().std(dim=0, correction=0).mean(),
                }
        return {"loss": loss, **metrics}

    def _accumulate_center(self, teacher_out: Tensor) -> None:
        batch_sum = teacher_out.sum(dim=0, keepdim=True)  # [1, K]
        self._center_sum = batch_sum if self._center_sum is None else self._center_sum + batch_sum
        self._center_count += teacher_out.shape[0]

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """DINO's ``cancel_gradients_last_layer``: no update of the last layer during the first epoch(s)."""
        if self.last_layer_frozen(ctx.step):
            for p in self.student.head.last_layer.parameters():
                p.grad = None  # AdamW skips it entirely: no moment update, no weight decay

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Teacher EMA on each rank's shards, then the center from this step's teacher outputs (all ranks,
        all micro-batches): what one big batch would give."""
        student = list(self.student.parameters())
        teacher = list(self.teacher.parameters())
        ctx.ops.ema_(teacher, student, self.momentum_at(ctx.step))
        self._update_center(ctx)

    @torch.no_grad()
    def _update_center(self, ctx: StepContext) -> None:
        if self._center_sum is None:
            return
        count = torch.full((1,), float(self._center_count), device=self._center_sum.device)
        total = ctx.dist.all_reduce_sum(torch.cat([self._center_sum.flatten(), count]))  # one collective
        teacher_sum = total[:-1].view_as(self.center)
        self.center.copy_(center_update(self.center, teacher_sum, total[-1], self.center_momentum))
        self._center_sum, self._center_count = None, 0

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        """The teacher's last-block self-attention of the class token on the first global crop (the
        paper's Figure 1): per image a strip ``[image | head 1 | ... | head H]`` and the mean over heads.
        Each map is min-max scaled to [0, 1] and upsampled to pixels (nearest, as visualize_attention.py)."""
        imgs = batch["images"][0]  # [N, C, S, S]
        backbone = self.teacher.backbone
        attn = backbone.get_last_selfattention(imgs)  # [N, H, 1+L, 1+L] float32
        n, heads = attn.shape[:2]
        p = backbone.patch_size
        gh, gw = imgs.shape[-2] // p, imgs.shape[-1] // p
        maps = attn[:, :, 0, 1:].reshape(n, heads, gh, gw)  # class token -> patches

        def unit(x: Tensor) -> Tensor:  # per map min-max to [0, 1]
            low = x.amin(dim=(-2, -1), keepdim=True)
            high = x.amax(dim=(-2, -1), keepdim=True)
            return (x - low) / (high - low).clamp_min(1e-12)

        per_head = F.interpolate(unit(maps), scale_factor=p, mode="nearest")  # [N, H, S, S]
        mean = F.interpolate(unit(maps.mean(dim=1, keepdim=True)), scale_factor=p, mode="nearest")
        view = self.views()[0]
        pix_mean = torch.tensor(view.mean, device=imgs.device).view(1, -1, 1, 1)
        pix_std = torch.tensor(view.std, device=imgs.device).view(1, -1, 1, 1)
        image = (imgs.float() * pix_std + pix_mean).clamp(0.0, 1.0)
        tiles = [image, *(per_head[:, h : h + 1].expand(-1, 3, -1, -1) for h in range(heads))]
        return {
            "dino/attention_heads": torch.cat(tiles, dim=-1),  # [N, 3, S, (1 + H) * S]
            "dino/attention_mean": torch.cat([image, mean.expand(-1, 3, -1, -1)], dim=-1),
        }

    def backbone(self) -> nn.Module:
        """The student's encoder (``init.from`` loads it; :meth:`load_backbone` also sets the teacher)."""
        return self.student.backbone

    def load_backbone(self, state: dict[str, Tensor]) -> None:
        self.student.backbone.load_state_dict(state, strict=True)
        self.teacher.backbone.load_state_dict(state, strict=True)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """DINO's ``utils.get_params_groups``: no weight decay on biases and 1-D parameters (norms); every
        other trainable tensor is decayed, including ``pos_embed``, ``cls_token`` and a trainable
        ``last_layer.weight_g`` ([K, 1]), as in the authors' runs. The teacher is not trained."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
        ]

    def flops_per_sample(self) -> float:
        """Student forward + backward (3x forward) on every crop, teacher forward on the global crops,
        heads included (2 FLOPs per multiply-add; matrix products only, as pretrain.models.flops)."""
        enc = self.student.backbone
        head = self.student.head

        def crop(size: int) -> float:
            tokens = (size // enc.patch_size) ** 2 + 1
            encoder = vit_encoder_flops(tokens, enc.embed_dim, enc.depth, enc.mlp_ratio, enc.patch_size)
            return float(encoder + head.forward_flops())

        globals_ = self.num_global * crop(self.global_size)
        locals_ = self.num_local * crop(self.local_size) if self.num_local else 0.0
        return 3.0 * (globals_ + locals_) + globals_

    def export_backbone(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
        """The TEACHER's encoder (DINO evaluates the teacher), with timm's names and MAE's JSON keys."""
        prefix = "teacher.backbone."
        backbone = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        meta = vit_backbone_meta("dino", self.model_name, self.teacher.backbone, self.views()[0])
        meta["network"] = "teacher"
        return backbone, meta
