"""Offline image-text data for CLIP: the Tux Paint stamps and the Google emoji, with a held-out split.

Usage::

    python -m data_pipelines.image_text tuxpaint data/tuxpaint           # /usr/share/tuxpaint/stamps
    python -m data_pipelines.image_text emoji data/emoji --source PATH   # the unpacked npm package
        [--test-fraction 0.2] [--shard-size 200] [--caption '{caption} ({category})'] [--overwrite]

Each writes ``OUT/train`` and ``OUT/test`` with :func:`data_pipelines.build_shards.build_shards` (PNG
images, a ``.txt`` caption and a ``.cls`` category per sample; the manifests carry the category names).
The held-out items are a fixed function of each item's identity (a BLAKE2b hash of its path or emoji
code), so the split never changes with the package's file order or with ``--limit``-style subsets.
``OUT/test`` serves both CLIP evaluations: retrieval on its (image, caption) pairs, and zero-shot
classification into the categories (``evals.run --protocol zeroshot`` reads the class names from
the manifest).

Sources (registered with :mod:`data_pipelines.sources`, so ``build_shards --source-type`` knows them
once this module is imported):

* ``tuxpaint`` -- Debian's ``tuxpaint-stamps-default`` (GPL-2): raster stamps with an English caption
  in ``<name>.txt`` (its first line), mirrored variants and vector images left out (as
  :class:`~data_pipelines.sources.CaptionFolderSource`); the category is the top-level folder
  (``animals``, ``food``, ``symbols``, ...).
* ``emoji`` -- npm ``emoji-datasource-google`` 16.0.0 (images Apache-2.0): ``emoji.json`` (name,
  category) and ``img/google/64/<image>``, 64x64 RGBA (composited onto white); the caption is the
  lower-cased name, the category Unicode's (``Smileys & Emotion``, ``Food & Drink``, ...).

Captions: ``--caption`` formats each caption from ``{caption}`` (the item's own text) and ``{category}``
(its category name). The default, ``{caption} ({category})``, names the category in the caption as
web alt-text often does, so that a small model trained on a few hundred pairs has seen the category
words its zero-shot prompts use; zero-shot then measures whether unseen *images* are put in the right
category. ``--caption '{caption}'`` gives the bare captions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipelines import sources as src
from data_pipelines.sources import SampleSource, SkipSample, SourceError, SourceItem, SourceSpec

log = logging.getLogger(__name__)

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
EMOJI_IMAGES = Path("img") / "google" / "64"
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_CAPTION = "{caption} ({category})"
_CATEGORY_NAMES = {"naturalforces": "natural forces"}  # Tux Paint folder -> words


def held_out(identity: str, test_fraction: float) -> bool:
    """Whether the item named ``identity`` belongs to the test split (a fixed hash, ~``test_fraction``)."""
    digest = hashlib.blake2b(identity.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < test_fraction


def _split_items(items: list[Any], split: str, test_fraction: float, identity: Any) -> list[Any]:
    want_test = split == "test"
    return [it for it in items if held_out(identity(it), test_fraction) == want_test]


class _ImageTextSource(SampleSource):
    """Shared behaviour: items are (identity, image path, caption text or None, category index)."""

    extra_members = ("txt",)
    test_fraction = DEFAULT_TEST_FRACTION
    caption_format = DEFAULT_CAPTION

    def __init__(
        self, spec: SourceSpec, root: Path, items: list[tuple[str, str, str | None, int]], classes: list[str]
    ):
        super().__init__(spec)
        self.root, self.items, self._classes = root, items, classes

    def __len__(self) -> int:
        return len(self.items)

    @property
    def classes(self) -> list[str]:
        return self._classes

    def _caption(self, index: int) -> str:
        raise NotImplementedError

    def item(self, index: int) -> SourceItem:
        identity, rel, _, label = self.items[index]
        caption = self.caption_format.format(caption=self._caption(index), category=self._classes[label])
        return SourceItem(
            index=index,
            key=self.key_for(index, len(self)),
            image=(self.root / rel).read_bytes(),
            label=label,
            meta={
                "source": rel,
                "index": index,
                "label": label,
                "class": self._classes[label],
                "id": identity,
            },
            extras={"txt": caption.encode("utf-8")},
        )

    def item_path(self, index: int) -> str:
        return str(self.root / self.items[index][1])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "root": str(self.root),
            "test_fraction": self.test_fraction,
            "caption_format": self.caption_format,
        }


@src.register_source
class TuxPaintSource(_ImageTextSource):
    """The Tux Paint stamps: captioned raster images; category = top-level folder."""

    kind = "tuxpaint"

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        return False  # a caption folder like any other: chosen explicitly (--source-type tuxpaint)

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> TuxPaintSource:
        if not path.is_dir():
            raise SourceError(f"{path}: not a directory; the Tux Paint stamps live in {TUXPAINT_STAMPS}")
        images = [p for p in src._images_under(path) if not src._is_variant(p)]
        captioned = [p for p in images if p.with_suffix(src.CAPTION_EXT).is_file()]
        if not captioned:
            raise SourceError(
                f"{path}: no images with a caption file beside them (<name>.png + <name>.txt); is this the "
                f"Tux Paint stamps folder ({TUXPAINT_STAMPS}, Debian package tuxpaint-stamps-default)?"
            )
        folders = sorted(
            {p.relative_to(path).parts[0] for p in captioned if len(p.relative_to(path).parts) > 1}
        )
        classes = [_CATEGORY_NAMES.get(f, f) for f in folders]
        items = []
        for p in captioned:
            rel = p.relative_to(path)
            if len(rel.parts) < 2:
                continue  # a stamp at the top level has no category
            items.append((rel.with_suffix("").as_posix(), rel.as_posix(), None, folders.index(rel.parts[0])))
        items = _split_items(items, split, cls.test_fraction, lambda it: it[0])
        if limit is not None:
            items = items[:limit]
        return cls(SourceSpec(cls.kind, str(path), split, limit), path, items, classes)

    def _caption(self, index: int) -> str:
        return src.read_caption((self.root / self.items[index][1]).with_suffix(src.CAPTION_EXT))


def emoji_package_dir(path: Path) -> Path:
    """The folder holding ``emoji.json`` (the npm package's ``package/``, or ``path`` itself)."""
    for candidate in (path, path / "package"):
        if (candidate / "emoji.json").is_file():
            return candidate
    raise SourceError(
        f"{path}: no emoji.json here or in {path / 'package'}; unpack the npm package first: "
        f"npm pack {EMOJI_PACKAGE} && tar xzf emoji-datasource-google-16.0.0.tgz"
    )


@src.register_source
class EmojiSource(_ImageTextSource):
    """Google's emoji images with their Unicode names and categories (npm ``emoji-datasource-google``)."""

    kind = "emoji"

    @classmethod
    def detect(cls, path: Path, split: str) -> bool:
        return path.is_dir() and (
            (path / "emoji.json").is_file() or (path / "package" / "emoji.json").is_file()
        )

    @classmethod
    def open(cls, path: Path, split: str, limit: int | None) -> EmojiSource:
        root = emoji_package_dir(path)
        try:
            records = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SourceError(f"{root / 'emoji.json'}: unreadable ({exc})") from None
        if not isinstance(records, list):
            raise SourceError(f"{root / 'emoji.json'}: expected a JSON list of emoji records")
        usable = [
            r
            for r in records
            if isinstance(r, dict)
            and r.get("has_img_google", True)
            and r.get("image")
            and r.get("category")
            and (r.get("name") or r.get("short_name"))
        ]
        if not usable:
            raise SourceError(f"{root / 'emoji.json'}: no record has a name, a category and a Google image")
        categories = sorted({r["category"] for r in usable})
        classes = [c.replace("&", "and").lower() for c in categories]
        items = []
        for r in sorted(usable, key=lambda r: (r.get("sort_order", 0), r["image"])):
            name = str(r.get("name") or r["short_name"]).lower()
            rel = (EMOJI_IMAGES / r["image"]).as_posix()
            items.append((str(r.get("unified") or r["image"]), rel, name, categories.index(r["category"])))
        items = _split_items(items, split, cls.test_fraction, lambda it: it[0])
        if limit is not None:
            items = items[:limit]
        return cls(SourceSpec(cls.kind, str(path), split, limit), root, items, classes)

    def _caption(self, index: int) -> str:
        name = self.items[index][2]
        if not name:
            raise SkipSample("emoji without a name")
        return name


def build_image_text(
    kind: str,
    out: str | Path,
    source: str | Path | None = None,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    caption_format: str = DEFAULT_CAPTION,
    shard_size: int = 200,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Build ``OUT/train`` and ``OUT/test`` shards of an image-text source; return both manifests.

    Args:
        kind: ``tuxpaint`` or ``emoji``.
        out: output directory.
        source: the data's folder (None: the Tux Paint stamps' Debian location; required for emoji).
        test_fraction: share of items held out (by a fixed hash of each item's identity).
        caption_format: caption template with ``{caption}`` and ``{category}``.
        shard_size: samples per shard.
        overwrite: rebuild shards built with other arguments.
        progress: show progress bars.

    Raises:
        SourceError: missing or unrecognised data; ValueError: bad arguments.
    """
    from data_pipelines.build_shards import build_shards

    if kind not in SOURCES:
        raise ValueError(f"unknown image-text source {kind!r}; valid: {', '.join(SOURCES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction={test_fraction} must be in (0, 1)")
    try:
        caption_format.format(caption="c", category="k")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"--caption={caption_format!r} is not a valid template ({exc!r}); use the fields {{caption}} and {{category}}"
        ) from None
    if source is None:
        if kind != "tuxpaint":
            raise ValueError(f"{kind}: give --source, the unpacked npm package {EMOJI_PACKAGE}")
        source = TUXPAINT_STAMPS
    if kind == "emoji":
        emoji_package_dir(Path(source))  # the package's own error message before the generic ones
    elif not Path(source).is_dir():
        raise SourceError(f"{source}: no such folder; the Tux Paint stamps live in {TUXPAINT_STAMPS}")
    cls = SOURCES[kind]
    cls.test_fraction, cls.caption_format = (
        test_fraction,
        caption_format,
    )  # read by open()/item() in this process
    manifests = {}
    for split in ("train", "test"):
        manifests[split] = build_shards(
            source,
            Path(out) / split,
            split=split,
            shard_size=shard_size,
            workers=1,  # the source classes live in this module: no spawned workers
            image_format="png",
            overwrite=overwrite,
            progress=progress,
            source_type=kind,
        )
    return manifests


SOURCES: dict[str, type[_ImageTextSource]] = {"tuxpaint": TuxPaintSource, "emoji": EmojiSource}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.image_text",
        description="Build CLIP image-text shards (train + held-out test) from the Tux Paint stamps or the emoji.",
    )
    p.add_argument("kind", choices=sorted(SOURCES), help="which data")
    p.add_argument("out", help="output directory: OUT/train and OUT/test")
    p.add_argument(
        "--source", help=f"data folder (tuxpaint default: {TUXPAINT_STAMPS}; emoji: the npm package)"
    )
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    p.add_argument("--caption", default=DEFAULT_CAPTION, help="caption template: {caption}, {category}")
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        manifests = build_image_text(
            args.kind,
            args.out,
            args.source,
            test_fraction=args.test_fraction,
            caption_format=args.caption,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest['num_samples']} samples, {len(manifest['classes'])} categories -> {Path(args.out) / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
