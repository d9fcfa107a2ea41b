"""The DeepSpeed ZeRO engine as real processes (torchrun, gloo, 2 ranks): ZeRO 1, 2 and 3 give the losses,
gradient norms and exported weights of the FSDP2 engine and of one process on the same global batch (with
and without clipping, with gradient accumulation); kill -9 and resume continue bit for bit; its checkpoints
refuse a planted pickle, another world size and another engine's files, each with a message; the export of
a ZeRO-3 run loads strict into timm; the engine registry refuses what DeepSpeed cannot do."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import ConfigError, load_config
from tests.components import require_module
from tests.conftest import TINY_MAE, run_cmd, train_cmd
from tests.test_train_distributed import common, export_weights, kill9_after_save, losses

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = ROOT / "configs" / "clip" / "tiny_tuxpaint.yaml"
TINY_DINO = ROOT / "configs" / "dino" / "tiny_fmnist.yaml"
SHORT = ["data.backend=synthetic", "train.steps=4", "train.global_batch_size=16", "optim.warmup_steps=1",
         "train.ckpt_every=100"]  # fmt: skip


def grad_norms(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/grad_norm" in rec:
            out[rec["step"]] = rec["train/grad_norm"]
    return out


def zero(stage: int, *extra: str) -> list[str]:
    return ["engine.name=deepspeed", f"engine.deepspeed.zero_stage={stage}", *extra]


# ---- the same maths as FSDP2 and one process ---------------------------------------------------
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "extra",
    [["optim.clip_grad=null"], ["optim.clip_grad=1.0", "train.accum_steps=2"]],
    ids=["no-clipping", "clipping-and-2-micro-batches"],
)
def test_zero_1_2_3_equal_fsdp2_and_one_process(tmp_path: Path, extra: list[str]):
    """Measured: the five runs agree to the last printed digit (gradient norm ~5 > 1.0, so clipping acts)."""
    args = [*SHORT, *extra]
    run_cmd(train_cmd(1, *common(tmp_path, "single", *args, "engine.name=single")))
    run_cmd(train_cmd(2, *common(tmp_path, "fsdp2", *args, "engine.name=fsdp2")))
    for stage in (1, 2, 3):
        run_cmd(train_cmd(2, *common(tmp_path, f"zero{stage}", *args, *zero(stage))), timeout=400)
    ref, ref_norm, ref_w = losses(tmp_path / "single"), grad_norms(tmp_path / "single"), None
    ref_w = export_weights(tmp_path / "single", 4)
    for run in ("fsdp2", "zero1", "zero2", "zero3"):
        got, norm = losses(tmp_path / run), grad_norms(tmp_path / run)
        assert sorted(got) == sorted(ref) == [1, 2, 3, 4], run
        for s in ref:
            assert abs(got[s] - ref[s]) < 1e-5, (run, s, got[s], ref[s])
            assert abs(norm[s] - ref_norm[s]) < 1e-4 * ref_norm[s], (run, s, norm[s], ref_norm[s])
        weights = export_weights(tmp_path / run, 4)  # from the fp32 master weights under ZeRO
        assert weights.keys() == ref_w.keys(), run
        for k in ref_w:
            assert weights[k].dtype == torch.float32
            torch.testing.assert_close(weights[k], ref_w[k], atol=1e-5, rtol=1e-4, msg=f"{run} {k}")


@pytest.mark.multiproc
def test_zero3_export_loads_strict_into_timm_with_the_same_features(tmp_path: Path):
    timm = require_module("timm", "pip install -r requirements.txt")
    run_cmd(train_cmd(2, *common(tmp_path, "z3", *SHORT, *zero(3))), timeout=400)
    export = tmp_path / "z3" / "exports" / "step_00000004"
    meta = json.loads((export / "backbone.json").read_text())
    weights = load_file(str(export / "backbone.safetensors"))
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=meta["img_size"], patch_size=meta["patch_size"], embed_dim=meta["embed_dim"],
        depth=meta["depth"], num_heads=meta["num_heads"], num_classes=0,
    )  # fmt: skip
    ref.load_state_dict(weights, strict=True)
    from pretrain.models import create_vit

    ours = create_vit(meta["arch"], img_size=meta["img_size"], patch_size=meta["patch_size"],
                      embed_dim=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
                      pos_embed=meta["pos_embed"])  # fmt: skip
    ours.load_state_dict(weights, strict=True)
    x = torch.randn(2, 3, meta["img_size"], meta["img_size"])
    torch.testing.assert_close(
        ref.eval().forward_features(x), ours.eval().forward_features(x), atol=1e-5, rtol=1e-5
    )


@pytest.mark.multiproc
def test_clip_under_zero3_equals_fsdp2(tmp_path: Path, tux_shards: Path):
    """CLIP's logit scale is a root-level parameter (gathered for the whole step under ZeRO-3), and its
    contrastive loss gathers features across ranks."""
    args = [f"data.shards={tux_shards / 'train'}", "train.steps=3", "train.global_batch_size=16",
            "train.ckpt_every=100", "model.depth=2", "method.text_depth=2", "data.num_workers=1"]  # fmt: skip
    run_cmd(
        train_cmd(2, *common(tmp_path, "fsdp2", *args, "engine.name=fsdp2"), config=TINY_CLIP), timeout=400
    )
    run_cmd(train_cmd(2, *common(tmp_path, "zero3", *args, *zero(3)), config=TINY_CLIP), timeout=400)
    a, b = losses(tmp_path / "fsdp2"), losses(tmp_path / "zero3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_kill9_and_resume_under_zero3_is_bitwise_identical(tmp_path: Path):
    args = ["data.backend=synthetic", "train.steps=12", "train.global_batch_size=16", "train.ckpt_every=4",
            "optim.warmup_steps=2", "run.deterministic=true", "train.visualize_every=6", *zero(3)]  # fmt: skip
    run_cmd(train_cmd(2, *common(tmp_path, "straight", *args)), timeout=400)
    cmd = train_cmd(2, *common(tmp_path, "killed", *args))
    kill9_after_save(cmd, tmp_path / "killed", tmp_path / "killed.log", reach=6, save=4)
    run_cmd(cmd, timeout=400)  # the same command again resumes from step 4
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(ref) == sorted(got) == list(range(1, 13))
    assert all(ref[s] == got[s] for s in ref), {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    wa, wb = export_weights(tmp_path / "straight", 12), export_weights(tmp_path / "killed", 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (
        json.loads((ckpt / "step_00000012" / "trainer_state.json").read_text())["state_format"] == "deepspeed"
    )
    assert os.readlink(ckpt / "latest") == "step_00000012"  # ours, not DeepSpeed's "latest" file
    assert not (ckpt / "latest").is_file() or (ckpt / "latest").is_dir()


@pytest.mark.multiproc
def test_another_world_size_is_refused_with_what_to_do(tmp_path: Path):
    args = [
        "data.backend=synthetic",
        "train.steps=2",
        "train.global_batch_size=8",
        "train.ckpt_every=2",
        *zero(2),
    ]
    run_cmd(train_cmd(2, *common(tmp_path, "w", *args)), timeout=400)
    extend = ["train.steps=4", "resume.allow_config_change=true"]
    proc = run_cmd(train_cmd(1, *common(tmp_path, "w", *args, *extend)), check=False, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "written by DeepSpeed on 2 rank(s), resumed on 1" in out and "init.from=" in out
    assert (tmp_path / "w" / "checkpoints" / "step_00000002" / "COMPLETE").exists()  # nothing lost


def test_a_planted_pickle_in_a_deepspeed_checkpoint_is_refused_and_never_runs(tmp_path: Path):
    args = [
        "data.backend=synthetic",
        "train.steps=2",
        "train.global_batch_size=8",
        "train.ckpt_every=2",
        *zero(2),
    ]
    run_cmd(train_cmd(1, *common(tmp_path, "m", *args)), timeout=400)  # one rank: a one-rank group
    ckpt = tmp_path / "m" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Evil()))
    extend = ["train.steps=4", "resume.allow_config_change=true"]
    proc = run_cmd(train_cmd(1, *common(tmp_path, "m", *args, *extend)), check=False, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "mp_rank_00_model_states.pt: refusing to load: not plain data" in out
    assert not marker.exists(), "the pickled payload ran"


def test_a_checkpoint_of_another_engine_is_refused_before_any_file_is_read(tmp_path: Path):
    args = ["data.backend=synthetic", "train.steps=2", "train.global_batch_size=8", "train.ckpt_every=2"]
    run_cmd(train_cmd(1, *common(tmp_path, "e", *args, "engine.name=single")))
    extend = ["train.steps=4", "resume.allow_config_change=true", *zero(2)]
    proc = run_cmd(train_cmd(1, *common(tmp_path, "e", *args, *extend)), check=False, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "in 'dcp' format, but this run's engine (DeepSpeedEngine) reads 'deepspeed'" in out


# ---- the registry and the config ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        (TINY_MAE, "engine.deepspeed.zero_stag=3", "did you mean 'engine.deepspeed.zero_stage'"),
        (TINY_MAE, "engine.name=deepsped", "did you mean 'deepspeed'"),
        (
            TINY_MAE,
            "engine.deepspeed.zero_stage=0",
            "Stage 0 is plain data parallelism: use engine.name=fsdp2",
        ),
        (TINY_MAE, "engine.deepspeed.offload_param=true", "needs engine.deepspeed.zero_stage=3"),
        (
            TINY_MAE,
            "optim.clip_mode=per_param",
            "optim.clip_mode=per_param is not supported by engine.name=deepspeed",
        ),
        (TINY_DINO, "optim.clip_mode=global", "DINO.before_optimizer_step"),
    ],
)
def test_the_config_refuses_what_deepspeed_cannot_do(config: Path, override: str, message: str):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(config, ["engine.name=deepspeed", override], world_size=2)
    assert message in str(err.value), str(err.value)


def test_each_engine_has_its_own_typed_section():
    cfg = load_config(TINY_MAE, ["engine.name=deepspeed", "engine.deepspeed.zero_stage=3"], world_size=2)
    assert cfg.engine.deepspeed.zero_stage == 3 and cfg.engine.fsdp2.reshard_after_forward is True
    with pytest.raises(ConfigError, match=r"engine\.fsdp2\.reshard_after_forward"):
        load_config(TINY_MAE, ["engine.fsdp2.reshard_after_forward=maybe"], world_size=2)
    from pretrain.engines import ENGINES

    assert sorted(ENGINES) == ["deepspeed", "fsdp2", "single"]
