"""Real human speech with transcripts: Debian's Asterisk voice prompts (en, es, fr).

They are what tests, draft training and benchmarks use here: 8 kHz WAVs of one voice per language,
each with a line of transcript in the package docs. Clips are short (a second or two), so long-form
audio is made by concatenating them.

Debian also packages other voices reading the same prompts (Colombian Spanish, a second French
voice): raw GSM 6.10, no transcripts. They install into the core sounds' folders, which dpkg
refuses, so they are downloaded and unpacked into the cache instead; draft training uses them.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_export.cache import cached_dir

log = logging.getLogger(__name__)

SOUNDS_ROOT = Path("/usr/share/asterisk/sounds")
DOCS_ROOT = Path("/usr/share/doc")
LANGUAGES = ("en", "es", "fr")  # the languages whose recordings drafts train on
# Languages Debian ships recordings of: the two beyond LANGUAGES are for evaluation alone.
RECORDED = (*LANGUAGES, "it", "ru")
LONG_FORM_PAUSE = 0.3  # seconds of silence between joined prompts
# A second voice per language: (Debian package, its language folder). Raw GSM 6.10 at 8 kHz.
OTHER_VOICES = {"es": ("asterisk-prompt-es-co", "es"), "fr": ("asterisk-prompt-fr-armelle", "fr")}
GSM_RATE = 8_000


@dataclass(frozen=True)
class Prompt:
    language: str
    name: str  # path under the language folder, without .wav
    path: Path
    text: str
    seconds: float


def package_name(language: str) -> str:
    return f"asterisk-core-sounds-{language}-wav"


def ensure_installed(languages: tuple[str, ...] = LANGUAGES) -> None:
    """Install the Debian packages that are missing (as root, through apt-get), or say how to."""
    missing = [lang for lang in languages if not (SOUNDS_ROOT / lang).is_dir()]
    if not missing:
        return
    packages = [package_name(lang) for lang in missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"speech prompts missing: install them with `apt-get install {' '.join(packages)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def _transcripts(language: str) -> dict[str, str]:
    path = DOCS_ROOT / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"
    entries: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            text = text.strip()
            # Stage directions ("[this is a simple beep tone]", "(3 seconds of silence)") are not speech.
            if text and not text.startswith(("[", "(")):
                entries[name.strip()] = text
    return entries


@cache
def prompts(language: str) -> tuple[Prompt, ...]:
    """Every prompt of a language that has a WAV and a spoken transcript, sorted by name."""
    ensure_installed((language,))
    folder = SOUNDS_ROOT / language
    found = []
    for name, text in sorted(_transcripts(language).items()):
        path = folder / f"{name}.wav"
        if path.is_file():
            found.append(Prompt(language, name, path, text, sf.info(str(path)).duration))
    return tuple(found)


def other_voice(language: str) -> tuple[tuple[str, Path], ...]:
    """(prompt name, GSM file) of ``language``'s second voice, sorted; none if it has none or its
    package cannot be fetched (a warning says why). Names match :func:`prompts`' (the same prompts)."""
    if language not in OTHER_VOICES:
        return ()
    package, folder = OTHER_VOICES[language]
    try:
        unpacked = cached_dir("voices", package, lambda tmp: _download_and_unpack(package, tmp))
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("no second %s voice: fetching %s failed (%s)", language, package, error)
        return ()
    root = unpacked / "usr/share/asterisk/sounds" / folder
    return tuple((str(path.relative_to(root).with_suffix("")), path) for path in sorted(root.rglob("*.gsm")))


def _download_and_unpack(package: str, into: Path) -> None:
    """``apt-get download`` (after ``apt-get update`` if the package lists lack it and we are root),
    then ``dpkg-deb -x`` into ``into``: nothing is installed."""
    download = into / "deb"
    download.mkdir()
    command = ["apt-get", "download", "-qq", package]
    if subprocess.run(command, cwd=download, capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(command, cwd=download, check=True, capture_output=True)
    for deb in download.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, capture_output=True)
    shutil.rmtree(download)


def load_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at ``sample_rate`` (resampled with soxr's high-quality filter). ``.gsm`` files are
    headerless GSM 6.10 at 8 kHz, as Asterisk keeps them."""
    raw = {"format": "RAW", "subtype": "GSM610", "samplerate": GSM_RATE, "channels": 1}
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True, **(raw if Path(path).suffix == ".gsm" else {}))
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return audio.astype(np.float32, copy=False)


def select(language: str, count: int, min_seconds: float = 2.0, max_seconds: float = 30.0) -> list[Prompt]:
    """``count`` prompts between the given lengths, spread evenly over the sorted list (reproducible)."""
    pool = [p for p in prompts(language) if min_seconds <= p.seconds <= max_seconds]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} {language} prompts of {min_seconds}-{max_seconds} s, {count} wanted")
    step = len(pool) / count
    return [pool[int(i * step)] for i in range(count)]


def long_form_prompts(language: str, seconds: float, skip: int = 0) -> list[Prompt]:
    """Consecutive prompts (of >= 1 s, from the ``skip``-th on) that with 0.3 s pauses last ``seconds``."""
    chosen: list[Prompt] = []
    total = 0.0
    for prompt in [p for p in prompts(language) if p.seconds >= 1.0][skip:]:
        chosen.append(prompt)
        total += prompt.seconds + LONG_FORM_PAUSE
        if total >= seconds:
            return chosen
    raise ValueError(f"not enough {language} prompts for {seconds} s of audio")


def long_form(language: str, seconds: float, skip: int = 0) -> np.ndarray:
    """Speech-dense long-form audio: :func:`long_form_prompts` joined by short pauses."""
    pause = np.zeros(int(LONG_FORM_PAUSE * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate(
        [piece for p in long_form_prompts(language, seconds, skip) for piece in (load_audio(p.path), pause)]
    )
