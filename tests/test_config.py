"""Config: precedence, unknown keys, validation, round trip, resume conflicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, diff_configs, load_config, to_yaml, write_or_check_run_config
from tests.conftest import ROOT, TINY_MAE

PAPER_MAE = ROOT / "configs" / "mae" / "vit_l16_in1k.yaml"


def test_precedence_defaults_yaml_cli():
    cfg = load_config(TINY_MAE, ["train.steps=7", "method.mask_ratio=0.5"])
    assert cfg.train.steps == 7  # CLI beats YAML (300)
    assert cfg.method.mask_ratio == 0.5
    assert cfg.train.global_batch_size == 128  # YAML beats the default (256)
    assert cfg.optim.eps == 1e-8  # default, not in the YAML
    assert cfg.method.decoder_mlp_ratio == 4.0  # method dataclass default


def test_paper_recipe_values():
    cfg = load_config(PAPER_MAE, world_size=64)
    assert cfg.model.name == "vit_large_patch16" and cfg.method.mask_ratio == 0.75
    assert (cfg.method.decoder_depth, cfg.method.decoder_embed_dim) == (8, 512)
    assert cfg.train.global_batch_size == 4096 and list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.optim.base_lr == 1.5e-4 and cfg.optim.weight_decay == 0.05
    assert cfg.train.steps == 800 * 312 and cfg.optim.warmup_steps == 40 * 312


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stpes=5", "did you mean 'train.steps'"),
        ("optim.weight_decy=0.1", "did you mean 'optim.weight_decay'"),
        ("method.mask_ration=0.5", "did you mean 'method.mask_ratio'"),
        ("trian.steps=5", "did you mean 'train'"),
    ],
)
def test_unknown_key_names_nearest(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY_MAE, [override])


def test_unknown_key_in_yaml_names_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_MAE.read_text().replace("keep_last: 2", "keep_lats: 2"))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "train.keep_last" in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (["train.global_batch_size=100"], 3, "multiple of world_size \\(3\\) x train.accum_steps"),
        (["train.keep_last=1"], 1, "keep_last=1 must be >= 2"),
        (["optim.warmup_steps=-1"], 1, "warmup_steps=-1"),
        (
            ["train.precision=fp16"],
            1,
            "train.precision='fp16' is not valid; did you mean 'bf16'\\? Valid values: auto, bf16, fp32",
        ),
        (["engine.name=fsdp"], 1, "did you mean 'fsdp2'"),
        (
            ["model.name=vit_base_patch61"],
            1,
            "model.name='vit_base_patch61' is not valid; did you mean 'vit_base_patch16'",
        ),
        (["data.backend=dalli"], 1, "data.backend='dalli' is not valid; did you mean 'dali'"),
        (["model.num_heads=7"], 1, "model.num_heads=7 must divide model.embed_dim=96"),
        (["method.mask_ratio=1.5"], 1, "mask_ratio=1.5 must be in"),
        (["model.patch_size=5"], 1, "multiple of model.patch_size=5"),
        (["run.name=has space"], 1, "run.name"),
        (["train.steps=abc"], 1, "train.steps"),
    ],
)
def test_validation_errors(overrides, world, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY_MAE, overrides, world_size=world)


def test_size_rules_name_the_registry_values_they_use():
    base = ["method.name=mae", "run.name=x", "data.backend=synthetic", "model.name=vit_small_patch16"]
    with pytest.raises(
        ConfigError, match=r"model.num_heads=5 must divide model.embed_dim=384 \(the value of"
    ):
        load_config(None, [*base, "model.num_heads=5"])
    with pytest.raises(
        ConfigError, match=r"model.img_size=100 must be a positive multiple of model.patch_size=16"
    ):
        load_config(None, [*base, "model.img_size=100"])


def test_a_recipe_starts_from_its_base_and_changes_only_what_differs(tmp_path: Path):
    zero3 = load_config(ROOT / "configs" / "mae" / "vit_l16_in1k_zero3.yaml", world_size=64)
    paper = load_config(PAPER_MAE, world_size=64)
    assert zero3.engine.name == "deepspeed" and zero3.engine.deepspeed.zero_stage == 3
    diff = {k for k in diff_configs(paper, zero3)}
    assert diff == {"run.name", "engine.name", "engine.deepspeed.zero_stage"}, diff
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmethod:\n  name: mae\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: missing\.yaml: config file not found"):
        load_config(tmp_path / "c.yaml")


def test_unknown_method_suggests():
    with pytest.raises(ConfigError, match="did you mean 'mae'"):
        load_config(TINY_MAE, ["method.name=maee"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY_MAE, ["train.steps"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_resolved_round_trip(tmp_path: Path):
    cfg = load_config(TINY_MAE, ["train.steps=11"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    again = load_config(dumped)
    assert diff_configs(cfg, again) == {}
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(again)


def test_resume_conflict_refused_then_allowed(tmp_path: Path):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY_MAE)
    write_or_check_run_config(cfg, run_dir, None)
    # safe change: different logging
    write_or_check_run_config(load_config(TINY_MAE, ["train.log_every=5"]), run_dir, 100)
    # the schedules' horizon is not a free change: it says why
    with pytest.raises(ConfigError, match=r"train.steps: saved 300 -> now 900(.|\n)*horizon of the lr"):
        write_or_check_run_config(load_config(TINY_MAE, ["train.steps=900"]), run_dir, 100)
    changed = load_config(TINY_MAE, ["optim.base_lr=0.1"])
    with pytest.raises(ConfigError, match=r"optim.base_lr: saved 0.0015 -> now 0.1"):
        write_or_check_run_config(changed, run_dir, 100)
    allowed = load_config(TINY_MAE, ["optim.base_lr=0.1", "resume.allow_config_change=true"])
    write_or_check_run_config(allowed, run_dir, 100)
    assert OmegaConf.load(run_dir / "config.yaml").optim.base_lr == 0.1
    backup = run_dir / "config.before_step_00000100.yaml"
    assert OmegaConf.load(backup).optim.base_lr == 0.0015  # nothing written is lost
