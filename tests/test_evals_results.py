"""Result files keyed by protocol and recipe, one TensorBoard point per step, and the report's comparisons.

Every test runs the real ``evals.run`` (k-NN or the linear probe) on a tiny ViT export and tiny real
shards written here (two visually different classes, 16 px), so it takes seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from evals import report as evals_report
from evals import run as evals_run
from evals.results import list_results, load_results
from tests.test_evals_units import tiny_export, write_shards


def _images(n: int, seed: int) -> list[tuple[np.ndarray, int, None]]:
    """Class 0: dark noise; class 1: bright noise with a bar (16 x 16 RGB)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        img = rng.integers(0, 90, size=(16, 16, 3), dtype=np.uint8) + (120 if label else 0)
        if label:
            img[6:10, :, :] = 255
        out.append((img.astype(np.uint8), label, None))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keyed_data")
    write_shards(root / "train", _images(40, 0), shard_size=20, classes=["dark", "bright"])
    write_shards(root / "test", _images(20, 1), shard_size=20, classes=["dark", "bright"])
    return root


def _eval(export: Path, data: Path, protocol: str, *extra: str) -> None:
    argv = ["--checkpoint", str(export), "--protocol", protocol, "--data", str(data), "--device", "cpu",
            "--no-progress", "data.num_workers=0", *extra]  # fmt: skip
    assert evals_run.main(argv) == 0


def _results(run: Path, protocol: str) -> dict[str, dict]:
    return {
        p.name: json.loads(p.read_text())
        for p in sorted((run / "evals" / "step_00000010").glob(f"{protocol}*.json"))
    }


def test_other_recipe_never_replaces_a_result(tmp_path: Path, data: Path) -> None:
    export = tiny_export(tmp_path / "run" / "exports" / "step_00000010", 10)
    _eval(export, data, "knn", "knn.k=[5]")
    first = _results(tmp_path / "run", "knn")
    _eval(export, data, "knn", "knn.k=[3]")  # another recipe: a new file beside the first
    both = _results(tmp_path / "run", "knn")
    assert len(both) == 2 and sorted(r["settings"]["knn"]["k"] for r in both.values()) == [[3], [5]]
    (name5,) = first
    assert both[name5]["created"] == first[name5]["created"] or both[name5] == first[name5]
    # The recipe is readable inside the file and its id is part of the file name.
    for name, res in both.items():
        assert (
            res["recipe"]["id"] in name
            and res["recipe"]["settings"]["knn"]["k"] == res["settings"]["knn"]["k"]
        )
        assert res["recipe"]["data"]["test"] == res["data"]["test"]["manifest_sha256"]
    # The same recipe again replaces its own file only.
    _eval(export, data, "knn", "knn.k=[5]")
    again = _results(tmp_path / "run", "knn")
    assert sorted(again) == sorted(both) and again[name5]["settings"]["knn"]["k"] == [5]
    # Operational settings (extraction batch, workers) are not part of the recipe.
    _eval(export, data, "knn", "knn.k=[5]", "data.batch_size=7")
    assert sorted(_results(tmp_path / "run", "knn")) == sorted(both)
    # The baseline at the same recipe shares the recipe id, with its own file.
    _eval(export, data, "knn", "knn.k=[5]", "--baseline", "random")
    names = sorted(_results(tmp_path / "run", "knn"))
    rid = both[name5]["recipe"]["id"]
    assert f"knn-{rid}.json" in names and f"knn_random-{rid}.json" in names and len(names) == 3


def test_other_data_is_another_result(tmp_path: Path, data: Path) -> None:
    export = tiny_export(tmp_path / "run" / "exports" / "step_00000010", 10)
    _eval(export, data, "knn", "knn.k=[5]")
    other = tmp_path / "other"
    write_shards(other / "train", _images(30, 2), shard_size=30, classes=["dark", "bright"])
    shutil.copytree(data / "test", other / "test")
    _eval(export, other, "knn", "knn.k=[5]")
    res = _results(tmp_path / "run", "knn")
    assert len(res) == 2 and sorted(r["data"]["train"]["num_samples"] for r in res.values()) == [30, 40]


def _scalar_points(tb: Path) -> dict[tuple[str, str], list[int]]:
    """(event directory, tag) -> steps, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out: dict[tuple[str, str], list[int]] = {}
    for run_dir in sorted({p.parent for p in tb.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[(str(run_dir.relative_to(tb)), tag)] = [e.step for e in acc.Scalars(tag)]
    return out


def test_rerun_adds_no_second_tensorboard_point(tmp_path: Path, data: Path) -> None:
    export = tiny_export(tmp_path / "run" / "exports" / "step_00000010", 10)
    tb = tmp_path / "run" / "evals" / "tb"
    _eval(export, data, "knn", "knn.k=[5]")
    once = _scalar_points(tb)
    assert once and all(steps == [10] for steps in once.values())
    _eval(export, data, "knn", "knn.k=[5]")  # the same recipe again at the same step
    assert _scalar_points(tb) == once
    _eval(export, data, "knn", "knn.k=[3]")  # another recipe: its own points, the first ones untouched
    third = _scalar_points(tb)
    assert all(steps == [10] for steps in third.values()) and len(third) > len(once)
    assert {k: v for k, v in third.items() if k in once} == once
    # A later export of the run adds the next point of the same curve.
    later = tiny_export(tmp_path / "run" / "exports" / "step_00000020", 20)
    _eval(later, data, "knn", "knn.k=[5]")
    fourth = _scalar_points(tb)
    assert {k: v for k, v in fourth.items() if k in once} == {k: [10, 20] for k in once}


def _rows(run: Path) -> list[dict]:
    rows = evals_report.collect_rows([run], evals_report.load_paper_results())
    return rows


def test_report_compares_pretrained_and_random_at_the_same_recipe(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    export = tiny_export(run / "exports" / "step_00000010", 10)
    fast = ["linear.epochs=2", "linear.warmup_epochs=0"]
    _eval(export, data, "linear", *fast)
    _eval(export, data, "linear", "--baseline", "random", *fast, "linear.init_std=0.02")  # another recipe
    rows = _rows(run)
    assert len(rows) == 2
    pre = next(r for r in rows if r["encoder"] == "pretrained")
    rnd = next(r for r in rows if r["encoder"] == "random init")
    assert pre["recipe_id"] != rnd["recipe_id"] and pre["vs_random"] == "-"  # never compared across recipes
    _eval(export, data, "linear", "--baseline", "random", *fast)  # the same recipe as the pretrained row
    rows = _rows(run)
    pre = next(r for r in rows if r["encoder"] == "pretrained")
    same = next(r for r in rows if r["encoder"] == "random init" and r["recipe_id"] == pre["recipe_id"])
    assert pre["vs_random"] == f"{pre['value'] - same['value']:+.2f} (vs {same['value']:.2f})"
    # A tiny 16 px ViT on two synthetic classes is not MAE's ViT-L/16 on ImageNet-1k: no paper number.
    assert all(r["paper"] == "-" for r in rows)
    # Rows of one recipe sit together: pretrained first, then its random-init baseline.
    ids = [r["recipe_id"] for r in rows]
    assert ids.index(pre["recipe_id"]) + 1 == ids.index(pre["recipe_id"], ids.index(pre["recipe_id"]) + 1)


def test_paper_number_only_where_architecture_and_data_match(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    export = tiny_export(run / "exports" / "step_00000010", 10)
    _eval(export, data, "linear", "linear.epochs=2", "linear.warmup_epochs=0")
    (path,) = (run / "evals" / "step_00000010").glob("linear*.json")
    res = json.loads(path.read_text())
    vit_l = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    in1k = {"train": {**res["data"]["train"], "num_samples": 1281167, "num_classes": 1000},
            "test": {**res["data"]["test"], "num_samples": 50000, "num_classes": 1000}}  # fmt: skip

    def row_with(**changes: object) -> dict:
        shutil.rmtree(run / "evals")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**res, **changes}))
        (row,) = _rows(run)
        return row

    ckpt_l = {**res["checkpoint"], "arch": "vit_large_patch16", "architecture": vit_l}
    assert row_with(checkpoint=ckpt_l, data=in1k)["paper"].startswith(
        "75.8 (vit_large_patch16, in1k, 1600 ep"
    )
    assert row_with(checkpoint=ckpt_l)["paper"] == "-"  # ViT-L/16, but the tiny data set
    assert row_with(data=in1k)["paper"] == "-"  # ImageNet-sized data, but the tiny ViT
    small = {**ckpt_l, "architecture": {**vit_l, "depth": 4}}
    assert row_with(checkpoint=small, data=in1k)["paper"] == "-"  # named vit_large_patch16, 4 blocks deep
    few = {**res["labels_subset"], "fraction": 0.01} if res.get("labels_subset") else {"fraction": 0.01}
    assert (
        row_with(checkpoint=ckpt_l, data=in1k, labels_subset=few)["paper"] == "-"
    )  # 1 % labels: not Table 4


def test_list_results_of_a_run(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    export = tiny_export(run / "exports" / "step_00000010", 10)
    _eval(export, data, "knn", "knn.k=[5]")
    _eval(export, data, "knn", "knn.k=[5]", "--baseline", "random", "--labels-fraction", "0.5")
    failed = run / "evals" / "step_00000010" / "linear-0123abcd.failed.json"
    failed.write_text(
        json.dumps({"exit_code": 1, "command": ["python"], "log_tail": "boom\nRuntimeError: out of memory\n"})
    )
    entries = list_results(run)
    assert [(e.step, e.protocol, e.state, e.encoder, e.labels_fraction) for e in entries] == [
        (10, "knn", "done", "pretrained", None),
        (10, "knn", "done", "random_init", 0.5),
        (10, "linear", "failed", "pretrained", None),
    ]
    done = entries[0]
    assert done.headline == "top1" and done.value == done.metrics["top1"] and done.recipe.startswith("k=5")
    assert done.recipe_id and done.file.name == f"knn-{done.recipe_id}.json"
    assert entries[2].detail == "exit code 1: RuntimeError: out of memory"
    assert len(load_results(run)) == 2  # the result payloads (markers are not results)
