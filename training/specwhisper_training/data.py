"""Training data for a draft decoder: audio windows and what the main model says on them.

A draft pays only when it predicts what the MAIN model will output, not what was spoken, so no
transcripts are needed: the targets are the main model's own greedy tokens and its likeliest ids,
decoded exactly as serving decodes (the exported ONNX graphs and the backend's logit filters) for
each prompt form served (transcribe/translate, with and without timestamps).

The few real recordings at hand (short Asterisk prompts in English, Spanish and French) are
memorised in a few epochs, so variety is made here: windows of 5-25 s concatenating random clips of
one language, like the long-form audio Whisper serves (the core voice, and a second one where Debian
has it), plus espeak-ng speaking new sentences recombined from the training split's transcripts,
and reading text in every language of the corpus: Debian's fortune-cookie prose where a package has
it, and the translated messages of the system's own programs (gettext catalogs) in all of them.
The targets are the main model's, so synthetic speech in a language teaches the draft what the
main model says in it. Clips are split into training and held-out BY FILE before anything is
concatenated, so no held-out recording (or its transcript) ever reaches training; a second voice's
reading of a held-out prompt is left out; and in the languages with no recordings, every fifth text
is held out and spoken only in held-out windows.

Everything (encoder outputs included: the draft reads them) is computed once, seeded, and kept in
``cache_root()/draft-data/<key>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import soxr
from tqdm import tqdm

from specwhisper_backend.facts import ModelFacts
from specwhisper_backend.features import SAMPLE_RATE, log_mel, window
from specwhisper_backend.logit_filters import LogitFilter
from specwhisper_backend.runtime import ExportedModel
from specwhisper_backend.stats import DecodeStats
from specwhisper_backend.transcriber import TranscribeOptions, Transcriber, compression_ratio
from specwhisper_export.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_export.presets import resolve_checkpoint
from specwhisper_export.repository import ExportRequest, export_artefacts
from specwhisper_training import asterisk

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
Split = Literal["train", "heldout"]
Task = Literal["transcribe", "translate"]
# The prompt forms served; every window is decoded in the default one plus others drawn at random.
DEFAULT_FORM: tuple[Task, bool] = ("transcribe", False)
OTHER_FORMS: tuple[tuple[Task, bool], ...] = (("transcribe", True), ("translate", False), ("translate", True))
# Whisper's twenty languages with the most training audio (Radford et al., 2022, figure 3), in that
# order: the base preset's draft covers them all.
MULTILINGUAL = (
    *("en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr"),
    *("pl", "ca", "nl", "ar", "sv", "it", "id", "hi", "fi", "vi"),
)
# espeak-ng voices per language (the built-in ones; mbrola voices need extra packages).
ESPEAK_VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp"),
    "es": ("es", "es-419"),
    "fr": ("fr-fr", "fr-be", "fr-ch"),
    "zh": ("cmn",),
    "de": ("de",),
    "ru": ("ru",),
    "ko": ("ko",),
    "ja": ("ja",),
    "pt": ("pt", "pt-br"),
    "tr": ("tr",),
    "pl": ("pl",),
    "ca": ("ca",),
    "nl": ("nl",),
    "ar": ("ar",),
    "sv": ("sv",),
    "it": ("it",),
    "id": ("id",),
    "hi": ("hi",),
    "fi": ("fi",),
    "vi": ("vi", "vi-vn-x-central", "vi-vn-x-south"),
}
# Festival's voices (Debian's festvox-* packages) per language, with the encoding each one's lexicon
# reads. They join recorded diphones or units, and the main model hears them far better than espeak-ng's
# formant synthesis (docs/experiments.md, 2026-12-04): in a language with no recordings here, its
# decoding of them is closer to what it says on human speech. Only where Festival has a voice.
FESTIVAL_VOICES: dict[str, tuple[tuple[str, str], ...]] = {
    "it": (("italian/lp_diphone", "latin-1"), ("italian/pc_diphone", "latin-1")),
    "ru": (("russian/msu_ru_nsh_clunits", "utf-8"),),
    "fi": (("finnish/suo_fi_lj_diphone", "latin-1"), ("finnish/hy_fi_mv_diphone", "latin-1")),
    "ca": (("catalan/upc_ca_ona_hts", "latin-1"),),
}
FESTIVAL_ROOT = Path("/usr/share/festival/voices")
NARROWBAND_RATE = 8_000  # a telephone line's sample rate (the recordings here have it)
# gettext catalogs per language (their folders under /usr/share/locale).
LOCALE_ROOT = Path("/usr/share/locale")
LOCALE_FOLDERS = {"zh": ("zh_CN", "zh_TW"), "pt": ("pt_BR", "pt")}
UNSPACED = ("zh", "ja")  # languages written without spaces: texts are measured in characters
ESPEAK_VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4")
# Text tokens per window at most: speech needs up to ~6 a second with timestamps; more is a
# repetition loop, which would hold up its whole batch (openai/whisper allows 224 per window).
TOKENS_PER_SECOND, MIN_TOKENS, MAX_TEXT_TOKENS = 8, 16, 224
HELDOUT_AUDIO_FILE = "heldout_audio.npz"
# Prose for espeak-ng beyond the few transcripts at hand: Debian's fortune cookies (apt packages
# fortunes, fortunes-{es,de,it,ru,pl,br}). Text the main model has never been asked about is what
# teaches a draft to read audio rather than recall the training sentences.
FORTUNES = Path("/usr/share/games/fortunes")
PASSAGE_WORDS = (15, 60)  # a prose passage's fewest and most words, unless CorpusOptions.passage_words says
FORTUNE_FOLDERS = {"en": FORTUNES, **{language: FORTUNES / language for language in ("es", "de", "it", "ru", "pl")}}
# Files other packages put in the English folder: fortunes-br's, read as Portuguese, and fortunes-zh's,
# not read (ANSI-coloured, with classical poems; Chinese has its catalogs).
FORTUNE_FILES = {"pt": ("brasil",)}
UNREAD_FORTUNES = ("chinese", "song100", "tang300")
NOT_ENGLISH_FORTUNES = frozenset(UNREAD_FORTUNES).union(*FORTUNE_FILES.values())


@dataclass(frozen=True)
class CorpusOptions:
    """What audio the draft learns from and which main-model outputs it imitates."""

    # Asterisk prompts (en, es, fr) and espeak-ng speech in these; the base preset's: MULTILINGUAL.
    languages: tuple[str, ...] = asterisk.LANGUAGES
    audio: tuple[str, ...] = ()  # extra files or folders (no transcripts; language detected by the main model)
    use_asterisk: bool = True
    train_windows: int = 60  # concatenated real-speech windows per language
    voice_windows: int = 30  # windows per language of its second Asterisk voice (es, fr), where one exists
    espeak_windows: int = 20  # synthetic windows of recombined transcripts per language with Asterisk prompts
    fortune_windows: int = 40  # synthetic windows of fortune-cookie prose, in languages that have it
    catalog_windows: int = 0  # synthetic windows of translated program messages, in every language
    heldout_windows: int = 20  # real-speech windows per language, from held-out files only
    heldout_synthetic_windows: int = 0  # synthetic windows per language without recordings, of held-out texts
    # Prompt forms each training window is decoded in (the default and others, 1-4): a form costs
    # decoding only, the window's encoder pass is shared. Held-out windows are decoded in two.
    training_forms: int = 2
    min_seconds: float = 5.0
    max_seconds: float = 25.0
    # Words a synthetic training window's passage holds, drawn evenly between the two (then cut at
    # max_seconds): read aloud, the default's longest passages stop short of a full window, so only
    # longer ones train the late token places of long-form speech's full windows.
    passage_words: tuple[int, int] = PASSAGE_WORDS
    heldout_every: int = 5  # every n-th file (by sorted name, per language) is held out
    max_files: int = 0  # per language and split before windowing; 0 keeps all (tests use a few)
    top_k: int = 16  # the main model's likeliest ids kept per position (the draft's vocabulary draws on them)
    # A synthetic training window's default-form target is the text espeak-ng spoke, read by the main
    # model teacher-forced (its likeliest ids at each position), instead of the main model's greedy
    # decoding: on robotic speech in a language it hears badly, the main model's own decoding is often
    # not what it says on human speech (loops, wrong words), and a draft trained on it learns those.
    spoken_targets: bool = False
    # Of the synthetic windows in a language Festival speaks (FESTIVAL_VOICES, where installed) and that
    # has no recordings here, the share Festival reads instead of espeak-ng.
    festival_share: float = 0.0
    # Of the synthetic windows, the share heard through a telephone's band (resampled to 8 kHz and
    # back): the human recordings here are 8 kHz, as is much of what a serving deployment transcribes
    # (call centres), and the synthetic voices speak full-band, so a draft trained on them alone meets
    # narrow-band speech in the languages it has no recordings of unprepared.
    narrowband_share: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.languages and not self.audio:
            raise ValueError("no audio: give languages (Asterisk/espeak-ng) or audio files")
        if unknown := set(self.languages) - set(ESPEAK_VOICES):
            raise ValueError(f"no built-in speech for {sorted(unknown)}; known: {sorted(ESPEAK_VOICES)}")
        counts = (
            self.train_windows,
            self.voice_windows,
            self.espeak_windows,
            self.fortune_windows,
            self.catalog_windows,
            self.heldout_windows,
            self.heldout_synthetic_windows,
            self.max_files,
        )
        if min(counts) < 0:
            raise ValueError("window and file counts must be >= 0")
        if not 1.0 <= self.min_seconds <= self.max_seconds <= 29.0:
            raise ValueError("need 1 <= min_seconds <= max_seconds <= 29 (a window is 30 s)")
        if self.heldout_every < 2:
            raise ValueError("heldout_every must be >= 2")
        if not 1 <= self.training_forms <= 1 + len(OTHER_FORMS):
            raise ValueError(f"training_forms must be in 1..{1 + len(OTHER_FORMS)}")
        if not 1 <= self.passage_words[0] <= self.passage_words[1]:
            raise ValueError("passage_words must be two counts, 1 <= fewest <= most")
        if not 0.0 <= self.festival_share <= 1.0:
            raise ValueError("festival_share must be in [0, 1]")
        if not 0.0 <= self.narrowband_share <= 1.0:
            raise ValueError("narrowband_share must be in [0, 1]")
        if not 1 <= self.top_k <= 256:
            raise ValueError("top_k must be in 1..256")


@dataclass(frozen=True)
class Clip:
    """One source file; ``name`` is unique and orders the held-out split."""

    language: str
    name: str
    path: Path
    text: str | None = None
    prompt: str | None = None  # the Asterisk prompt it reads, in whichever voice


@dataclass(frozen=True)
class Window:
    """Up to 30 s of audio the main model is run on (metadata; the audio is not kept)."""

    language: str
    split: Split
    source: Literal["speech", "espeak"]  # "espeak": synthetic speech (espeak-ng, or Festival where it reads)
    parts: tuple[str, ...]  # clip names or the spoken text
    seconds: float


@dataclass(frozen=True)
class Target:
    """The main model's greedy decoding of one window in one prompt form.

    ``tokens`` is prompt + text (+ end of text when it ended); position ``prompt_length - 1 + i``
    predicts ``tokens[prompt_length + i]``, and ``topk_ids[i]`` are the main model's ``top_k``
    likeliest ids there, best first (after the logit filters).
    """

    window: int
    task: Task
    timestamps: bool
    prompt_length: int
    tokens: np.ndarray  # int32 [T]
    topk_ids: np.ndarray  # int32 [T - prompt_length, k]

    @property
    def text_tokens(self) -> np.ndarray:
        return self.tokens[self.prompt_length :]


@dataclass
class DraftData:
    """A cached corpus: windows, the main encoder's output for each, and the targets."""

    directory: Path
    windows: list[Window]
    states: np.ndarray  # float16 [N, n_audio_ctx, d_model], memory-mapped
    targets: list[Target] = field(default_factory=list)

    def split(self, split: Split) -> list[Target]:
        return [t for t in self.targets if self.windows[t.window].split == split]


# Whisper's own repetition gate: served decoding decodes a window whose text is more repetitive
# again, at a higher temperature (TranscribeOptions.compression_ratio_threshold).
REPETITIVE = TranscribeOptions().compression_ratio_threshold


def repetitive(tokenizer, target: Target, eot: int) -> bool:
    """Whether the main model's text of ``target`` is a loop Whisper would not keep. Such texts are
    easy to draft (a loop repeats itself): the held-out report leaves them out, since counting them
    would flatter the draft in just the languages the main model hears worst, and training may
    (``leave_out_loops``). Served decoding keeps none of them."""
    text = tokenizer.decode([int(i) for i in target.text_tokens if i < eot])
    return compression_ratio(text) > REPETITIVE


def split_by_file(clips: Sequence[Clip], every: int) -> dict[Split, list[Clip]]:
    """Every ``every``-th clip of each language, by sorted name, is held out; the rest trains."""
    result: dict[Split, list[Clip]] = {"train": [], "heldout": []}
    for language in sorted({c.language for c in clips}):
        ordered = sorted((c for c in clips if c.language == language), key=lambda c: c.name)
        for index, clip in enumerate(ordered):
            result["heldout" if index % every == every - 1 else "train"].append(clip)
    return result


def concatenate(
    clips: Sequence[Clip], count: int, rng: random.Random, min_seconds: float, max_seconds: float, loader
) -> Iterator[tuple[list[str], np.ndarray]]:
    """``count`` windows of ``min_seconds``-``max_seconds``, each random clips of ``clips`` with short gaps.

    Clips longer than ``max_seconds`` are cropped; a window never repeats a clip.
    """
    limit = int(max_seconds * SAMPLE_RATE)
    for _ in range(count):
        goal = rng.uniform(min_seconds, max_seconds) * SAMPLE_RATE
        order = rng.sample(range(len(clips)), len(clips))
        names: list[str] = []
        pieces: list[np.ndarray] = []
        length = 0
        for index in order:
            audio = loader(clips[index])[:limit]
            gap = np.zeros(int(rng.uniform(0.1, 0.6) * SAMPLE_RATE), np.float32) if pieces else np.zeros(0, np.float32)
            if length + len(gap) + len(audio) > limit:
                if pieces:
                    continue
                audio = audio[:limit]
            pieces += [gap, audio]
            names.append(clips[index].name)
            length += len(gap) + len(audio)
            if length >= goal:
                break
        yield names, np.concatenate(pieces)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech of ``text`` at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(  # the text through stdin: a text starting with "-" is not read as an option
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), "--stdin"],
            input=text.encode("utf-8"),
            check=True,
            capture_output=True,
        )
        return asterisk.load_audio(path)


def festival_voices(language: str) -> list[tuple[str, str]]:
    """(voice, encoding) of the Festival voices installed for ``language`` (none without Festival)."""
    if shutil.which("text2wave") is None:
        return []
    voices = FESTIVAL_VOICES.get(language, ())
    return [(voice, encoding) for voice, encoding in voices if (FESTIVAL_ROOT / voice).is_dir()]


def festival_speech(text: str, voice: str, encoding: str, stretch: float) -> np.ndarray | None:
    """Festival's speech of ``text`` at 16 kHz, ``stretch`` times its voice's own pace; None where the
    voice's letter-to-sound rules refuse the text (it then writes no audio)."""
    # Its lexicons read letters and sentence punctuation; symbols stop a whole utterance.
    text = " ".join(re.sub(r"[^\w\s.,?!]", " ", text).split())
    with tempfile.TemporaryDirectory() as tmp:
        source, path = Path(tmp) / "text.txt", Path(tmp) / "speech.wav"
        source.write_bytes(text.encode(encoding, errors="ignore"))
        subprocess.run(
            [
                "text2wave",
                "-eval",
                f"(voice_{Path(voice).name})",
                "-eval",
                f"(Parameter.set 'Duration_Stretch {stretch:.2f})",
                str(source),
                "-o",
                str(path),
            ],
            check=True,
            capture_output=True,
        )
        if not path.is_file() or path.stat().st_size <= 44:  # a header and no samples
            return None
        return asterisk.load_audio(path)


def recombined_texts(texts: Sequence[str], rng: random.Random, sentences: tuple[int, int] = (2, 6)) -> str:
    """A new passage: whole training transcripts and word spans cut from others, in random order."""
    parts = []
    for _ in range(rng.randint(*sentences)):
        words = rng.choice(texts).split()
        if rng.random() < 0.5 and len(words) > 3:
            start = rng.randrange(len(words) - 2)
            words = words[start : start + rng.randint(3, len(words) - start)]
        parts.append(" ".join(words).rstrip(".,;:!?") + rng.choice([".", ".", ",", "?", "!"]))
    return " ".join(parts)


def text_length(text: str, language: str) -> int:
    """Words, or for a language written without spaces, characters over three (about a word)."""
    return len(text) // 3 if language in UNSPACED else len(text.split())


def fortune_passage(
    texts: Sequence[str], rng: random.Random, language: str = "en", words: tuple[int, int] = PASSAGE_WORDS
) -> str:
    """Random texts one after another, ``words`` (fewest, most) words in all."""
    goal = rng.randint(*words)
    chosen: list[str] = []
    while sum(text_length(t, language) for t in chosen) < goal:
        chosen.append(rng.choice(texts))
    return " ".join(chosen)


def catalog_texts(language: str) -> list[str]:
    """Translated messages of the system's programs in ``language`` (their gettext catalogs), cleaned
    of format codes and menu markers; sentences of 3-40 words (or 8-120 characters). Sorted, so that
    the held-out split does not depend on the file system's order."""
    import gettext

    texts = set()
    for folder in LOCALE_FOLDERS.get(language, (language,)):
        for path in sorted((LOCALE_ROOT / folder / "LC_MESSAGES").glob("*.mo")):
            try:
                with path.open("rb") as handle:
                    catalog = gettext.GNUTranslations(handle)._catalog
            except (OSError, ValueError) as error:  # a broken catalog (or one not in UTF-8) is skipped
                log.debug("skipping %s: %s", path, error)
                continue
            for key, value in catalog.items():
                if not key or not isinstance(value, str):  # the header, or a plural form's index
                    continue
                text = re.sub(r"%[-+ #0-9.*lhzjtL]*[a-zA-Z%]|\{[^}]*\}|<[^>]*>|[_&](?=\w)|\\[nt]", " ", value)
                text = " ".join(text.replace("\n", " ").split()).strip(" :")
                size = text_length(text, language)
                letters = sum(unicodedata.category(c)[0] in "LPZM" for c in text)  # letters, marks, punctuation
                if (8 if language in UNSPACED else 3) <= size <= 40 and letters >= 0.9 * len(text):
                    texts.add(text)
    return sorted(texts)


def split_texts(texts: Sequence[str], every: int) -> tuple[list[str], list[str]]:
    """(training, held-out): every ``every``-th text is held out."""
    return (
        [t for i, t in enumerate(texts) if i % every != every - 1],
        [t for i, t in enumerate(texts) if i % every == every - 1],
    )


def spoken_windows(
    make_text: Callable[[random.Random], str],
    language: str,
    count: int,
    rng: random.Random,
    max_seconds: float,
    festival_share: float = 0.0,
    narrowband_share: float = 0.0,
) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` windows of ``make_text(rng)`` spoken in ``language``: by espeak-ng with a random voice,
    speed and pitch, or (a ``festival_share`` of them, where Festival has a voice) by Festival at a
    random pace; a ``narrowband_share`` of them through a telephone's band (:func:`narrowband`)."""
    limit = int(max_seconds * SAMPLE_RATE)
    festival = festival_voices(language) if festival_share else []
    for _ in range(count):
        text = make_text(rng)
        audio = None
        if festival and rng.random() < festival_share:
            audio = festival_speech(text, *rng.choice(festival), stretch=rng.uniform(0.85, 1.2))
        if audio is None:
            voice = rng.choice(ESPEAK_VOICES[language]) + rng.choice(ESPEAK_VARIANTS)
            audio = synthesize(text, voice, speed=rng.randint(130, 200), pitch=rng.randint(25, 75))
        if narrowband_share and rng.random() < narrowband_share:
            audio = narrowband(audio)
        yield text, audio[:limit]


def narrowband(audio: np.ndarray) -> np.ndarray:
    """``audio`` (16 kHz) as an 8 kHz recording of it sounds: nothing above 4 kHz."""
    return soxr.resample(soxr.resample(audio, SAMPLE_RATE, NARROWBAND_RATE), NARROWBAND_RATE, SAMPLE_RATE).astype(
        np.float32
    )[: len(audio)]


def fortune_files(language: str) -> list[Path]:
    """Debian's fortune-cookie files in ``language`` (none if the package is not installed); not
    their ``.dat`` indexes or empty ``.u8`` markers."""
    if language in FORTUNE_FILES:
        return [FORTUNES / name for name in FORTUNE_FILES[language] if (FORTUNES / name).is_file()]
    folder = FORTUNE_FOLDERS.get(language)
    if folder is None or not folder.is_dir():
        return []
    return [
        path
        for path in sorted(folder.iterdir())
        if not path.is_symlink()
        and path.is_file()
        and path.suffix not in (".dat", ".u8")
        and not (language == "en" and path.name in NOT_ENGLISH_FORTUNES)
    ]


def fortune_texts(language: str) -> list[str]:
    """The plain-prose fortunes of ``language`` (attributions cut, art and tables left out)."""
    texts = []
    for path in fortune_files(language):
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = entry.splitlines()
            said = next((i for i, line in enumerate(lines) if line.strip().startswith("--")), len(lines))
            text = " ".join(" ".join(lines[:said]).split())
            prose = sum(c.isalpha() or c in " .,;:!?'\"-" for c in text)
            if 30 <= len(text) <= 400 and prose >= 0.97 * len(text):
                texts.append(text)
    return texts


def find_audio(paths: Sequence[str]) -> list[Path]:
    """Audio files named, or found under the folders named, sorted."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += [p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES]
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"no audio file or folder {item}")
    return sorted(set(found))


class MainTeacher:
    """The main model as served (ONNX Runtime, and the Transcriber's own prompts, logit filters and
    language detection), producing a draft's targets."""

    def __init__(self, main: str, threads: int = 2) -> None:
        self.model = ExportedModel(export_artefacts(ExportRequest(main=main)), intra_op_threads=threads)
        self.engine = Transcriber(self.model)
        self.facts: ModelFacts = self.model.facts

    def features(self, audio: np.ndarray) -> np.ndarray:
        return window(log_mel(audio, self.engine.mel_filters), 0)

    def detect_language(self, states: np.ndarray) -> str:
        self.model.main.start(states)
        return self.engine.detect_language(DecodeStats())

    def prompt(self, language: str, task: Task, timestamps: bool) -> list[int]:
        return self.engine.prompt(language, TranscribeOptions(language, task, timestamps), context=[])

    def filters(self, prompt_length: int, timestamps: bool) -> list[LogitFilter]:
        return self.engine.logit_filters(TranscribeOptions(timestamps=timestamps), prompt_length)

    def text(self, text: str, language: str) -> list[int]:
        """``text`` as the main model writes it after a prompt: a leading space where words are spaced."""
        return self.engine.text.encode(text if language in UNSPACED else " " + text.strip())

    def forced(
        self, states: np.ndarray, prompts: Sequence[list[int]], texts: Sequence[list[int]], top_k: int, limit: int
    ) -> list[tuple[list[int], np.ndarray]]:
        """The main model read teacher-forced, one row per prompt over ``states[row]``: the prompt, then
        at most ``limit`` of ``texts[row]`` (and end of text when all of it fits), with the ``top_k``
        likeliest ids at each of those positions (after the logit filters, as :meth:`greedy` gives
        them; the first need not be the token that follows)."""
        session, eot = self.model.main, self.facts.tokens.eot
        sequences = [[*p, *t[:limit], *([eot] if len(t) < limit else [])] for p, t in zip(prompts, texts, strict=True)]
        counts = np.asarray([len(s) - 1 for s in sequences])
        feed = np.full((len(sequences), counts.max()), eot, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            feed[row, : len(sequence) - 1] = sequence[:-1]
        session.start(states)
        logits = session.forward(feed, counts)
        results = []
        for row, (prompt, sequence) in enumerate(zip(prompts, sequences, strict=True)):
            rules = self.filters(len(prompt), timestamps=False)
            tops = []
            for position in range(len(prompt) - 1, len(sequence) - 1):
                tops.append(_likeliest(logits[row, position], rules, sequence[: position + 1], top_k))
            results.append((sequence, np.stack(tops).astype(np.int32)))
        return results

    def greedy(
        self, states: np.ndarray, prompts: Sequence[list[int]], timestamps: Sequence[bool], top_k: int, limit: int
    ) -> list[tuple[list[int], np.ndarray]]:
        """Batched greedy decoding, one row per prompt over ``states[row]``, of at most ``limit`` tokens:
        tokens and the ``top_k`` likeliest ids at each step."""
        session, eot = self.model.main, self.facts.tokens.eot
        rows = len(prompts)
        session.start(states)
        counts = np.asarray([len(p) - 1 for p in prompts])
        prefill = np.full((rows, counts.max()), eot, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            prefill[row, : len(prompt) - 1] = prompt[:-1]
        session.forward(prefill, counts)
        rules = [self.filters(len(p), ts) for p, ts in zip(prompts, timestamps, strict=True)]
        tokens = [list(p) for p in prompts]
        tops: list[list[np.ndarray]] = [[] for _ in prompts]
        alive = list(range(rows))  # the session's rows, by prompt; a finished one is dropped
        for _ in range(limit):
            logits = session.forward(np.asarray([[tokens[row][-1]] for row in alive]))[:, 0]
            for scores, row in zip(logits, alive, strict=True):
                ids = _likeliest(scores, rules[row], tokens[row], top_k)
                tops[row].append(ids)
                tokens[row].append(int(ids[0]))
            kept = [slot for slot, row in enumerate(alive) if tokens[row][-1] != eot]
            if not kept:
                break
            if len(kept) < len(alive):
                session.keep_rows(kept)
                alive = [alive[slot] for slot in kept]
        return [(tokens[row], np.stack(tops[row]).astype(np.int32)) for row in range(rows)]


def _likeliest(scores: np.ndarray, rules: Sequence[LogitFilter], tokens: Sequence[int], top_k: int) -> np.ndarray:
    """The ``top_k`` likeliest ids after ``tokens`` under the logit filters, best first (``scores`` is not
    changed)."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    for rule in rules:
        rule.apply(scores, tokens)
    ids = np.argpartition(-scores, top_k)[:top_k]
    return ids[np.argsort(-scores[ids])]


def _clips(options: CorpusOptions, teacher: MainTeacher) -> list[Clip]:
    clips: list[Clip] = []
    if options.use_asterisk:  # recordings to train on: English, Spanish and French only
        for language in (language for language in options.languages if language in asterisk.LANGUAGES):
            clips += [
                Clip(language, f"asterisk/{language}/{p.name}", p.path, p.text, p.name)
                for p in asterisk.prompts(language)
            ]
    for path in find_audio(options.audio):
        audio = asterisk.load_audio(path)[: 30 * SAMPLE_RATE]
        language = teacher.detect_language(teacher.model.encode(teacher.features(audio)))
        clips.append(Clip(language, str(path), path))
    return clips


def _other_voices(options: CorpusOptions, heldout: Sequence[Clip]) -> list[Clip]:
    """The second voices' clips that may train: not those reading a held-out prompt."""
    if not options.use_asterisk:
        return []
    held = {(c.language, c.prompt) for c in heldout}
    return [
        Clip(language, f"{asterisk.OTHER_VOICES[language][0]}/{prompt}", path, prompt=prompt)
        for language in options.languages
        for prompt, path in asterisk.other_voice(language)
        if (language, prompt) not in held
    ]


def _limit(clips: list[Clip], count: int) -> list[Clip]:
    """At most ``count`` clips per language, spread over the sorted list (0: all)."""
    if not count:
        return clips
    kept = []
    for language in sorted({c.language for c in clips}):
        mine = [c for c in clips if c.language == language]
        step = max(len(mine) / count, 1)
        kept += [mine[int(i * step)] for i in range(min(count, len(mine)))]
    return kept


def make_windows(options: CorpusOptions, teacher: MainTeacher) -> Iterator[tuple[Window, np.ndarray]]:
    """The corpus's windows with their audio, in a fixed (seeded) order. The held-out windows draw
    from a generator of their own: what the training split is made of never changes them."""
    rng, heldout_rng = random.Random(options.seed), random.Random(f"heldout-{options.seed}")
    splits = split_by_file(_clips(options, teacher), options.heldout_every)
    audio_cache: dict[str, np.ndarray] = {}

    def load(clip: Clip) -> np.ndarray:
        if clip.name not in audio_cache:
            audio_cache[clip.name] = asterisk.load_audio(clip.path)
        return audio_cache[clip.name]

    plan: list[tuple[Split, int, list[Clip]]] = [
        ("train", options.train_windows, splits["train"]),
        ("heldout", options.heldout_windows, splits["heldout"]),
        ("train", options.voice_windows, _other_voices(options, splits["heldout"]) if options.voice_windows else []),
    ]
    for split, count, chosen in plan:
        clips = _limit(chosen, options.max_files)
        for language in sorted({c.language for c in clips}):
            mine = [c for c in clips if c.language == language]
            draws = heldout_rng if split == "heldout" else rng
            for names, audio in concatenate(mine, count, draws, options.min_seconds, options.max_seconds, load):
                yield Window(language, split, "speech", tuple(names), len(audio) / SAMPLE_RATE), audio

    texts = {lang: [c.text for c in splits["train"] if c.language == lang and c.text] for lang in options.languages}
    synthetic = options.espeak_windows or options.fortune_windows or options.catalog_windows
    if synthetic and not espeak_available():
        log.warning("espeak-ng not found: training without synthetic speech (apt-get install espeak-ng)")
        return
    sources: list[tuple[Callable[[random.Random], str], str, int, Split]] = [
        (partial(recombined_texts, texts[language]), language, options.espeak_windows, "train")
        for language in options.languages
        if options.espeak_windows and texts[language]
    ]
    recorded = _recorded(options)
    for language in options.languages:
        held_out: list[str] = []
        for train, held, count in _prose_sources(options, language):
            held_out += held
            if count and train:
                passage = partial(fortune_passage, train, language=language, words=options.passage_words)
                sources.append((passage, language, count, "train"))
        if held_out and options.heldout_synthetic_windows:
            # Held-out passages keep PASSAGE_WORDS: a training option never changes what reports read.
            passage = partial(fortune_passage, held_out, language=language, words=PASSAGE_WORDS)
            sources.append((passage, language, options.heldout_synthetic_windows, "heldout"))
    for make_text, language, count, split in sources:
        draws = heldout_rng if split == "heldout" else rng
        share = 0.0 if language in recorded else options.festival_share
        narrow = options.narrowband_share if split == "train" else 0.0  # held-out windows stay as they were
        spoken = spoken_windows(make_text, language, count, draws, options.max_seconds, share, narrow)
        for text, audio in spoken:
            yield Window(language, split, "espeak", (text,), len(audio) / SAMPLE_RATE), audio


def _recorded(options: CorpusOptions) -> set[str]:
    """The corpus's languages held out on recordings; the others are held out on texts never trained
    on, and only they need Festival's voices."""
    return {language for language in options.languages if options.use_asterisk and language in asterisk.LANGUAGES}


def _prose_sources(options: CorpusOptions, language: str) -> list[tuple[list[str], list[str], int]]:
    """``language``'s prose sources (fortunes, program messages): each one's training texts, held-out
    texts and training windows."""
    sources = []
    for prose, count in (
        (fortune_texts(language), options.fortune_windows),
        (catalog_texts(language), options.catalog_windows),
    ):
        train, held = (prose, []) if language in _recorded(options) else split_texts(prose, options.heldout_every)
        sources.append((train, held, count))
    return sources


def heldout_prose(options: CorpusOptions, language: str) -> list[str]:
    """``language``'s prose texts that the corpus holds out (none where it is held out on recordings)."""
    return [text for _, held, _ in _prose_sources(options, language) for text in held]


def training_prose(options: CorpusOptions) -> list[str]:
    """Every prose text of the corpus's languages that training may read, whether or not it speaks
    it: the held-out split left out, so what the vocabulary rule counts never covers a held-out text
    by reading it."""
    return [
        text for language in options.languages for train, _, _ in _prose_sources(options, language) for text in train
    ]


def prompt_forms(windows: Sequence[Window], seed: int, training_forms: int = 2) -> list[list[tuple[Task, bool]]]:
    """Each window's prompt forms: the default one and others drawn at random, one for a held-out
    window and ``training_forms - 1`` for a training one. Each split draws from a generator of its
    own, in window order, so the held-out forms never depend on the training split."""
    draws = {split: random.Random(f"{split}-forms-{seed}") for split in ("train", "heldout")}
    others = {"train": training_forms - 1, "heldout": 1}
    return [[DEFAULT_FORM, *draws[w.split].sample(OTHER_FORMS, others[w.split])] for w in windows]


def spoken_target(window: Window, options: CorpusOptions, form: tuple[Task, bool]) -> bool:
    """Whether this window's target in this form is its spoken text (``CorpusOptions.spoken_targets``):
    synthetic training windows in the default form, whose audio holds all of the text. Held-out
    targets stay the main model's decoding: that is what a draft is measured against."""
    whole = window.seconds < options.max_seconds - 0.05  # a longer reading was cut at max_seconds
    return window.source == "espeak" and window.split == "train" and form == DEFAULT_FORM and whole


def _build(options: CorpusOptions, main: str, directory: Path, batch: int = 8) -> None:
    teacher = MainTeacher(main)
    produced = list(tqdm(make_windows(options, teacher), desc="draft data: audio windows", unit="window"))
    windows = [w for w, _ in produced]
    # Held-out audio is kept (small) so that reports can also decode it through the engine.
    heldout = {str(i): audio.astype(np.float16) for i, (w, audio) in enumerate(produced) if w.split == "heldout"}
    np.savez(directory / HELDOUT_AUDIO_FILE, **heldout)
    d_model = teacher.model.facts.main.heads * teacher.model.facts.main.head_dim
    states = np.lib.format.open_memmap(
        directory / "states.npy", mode="w+", dtype=np.float16, shape=(len(windows), teacher.facts.n_audio_ctx, d_model)
    )
    forms = prompt_forms(windows, options.seed, options.training_forms)
    records: list[dict] = []
    flat_tokens: list[np.ndarray] = []
    flat_ids: list[np.ndarray] = []
    # Batches of windows of similar length decode for similar numbers of steps: less padding work.
    # A decoder step reads all its weights whatever the batch, so bigger batches are cheaper per row.
    by_length = sorted(range(len(windows)), key=lambda i: windows[i].seconds)
    for first in tqdm(range(0, len(windows), batch), desc="draft data: main model targets", unit="batch"):
        chosen = by_length[first : first + batch]
        encoded = teacher.model.encode(np.concatenate([teacher.features(produced[i][1]) for i in chosen]))
        states[chosen] = encoded.astype(np.float16)
        rows = [(slot, i, task, ts) for slot, i in enumerate(chosen) for task, ts in forms[i]]
        prompts = [teacher.prompt(windows[i].language, task, ts) for _, i, task, ts in rows]
        seconds = max(windows[i].seconds for i in chosen)
        limit = min(MAX_TEXT_TOKENS, MIN_TOKENS + int(TOKENS_PER_SECOND * seconds))
        spoken = [options.spoken_targets and spoken_target(windows[i], options, (task, ts)) for _, i, task, ts in rows]
        read = [r for r, forced in enumerate(spoken) if forced]
        said = [r for r, forced in enumerate(spoken) if not forced]
        results: dict[int, tuple[list[int], np.ndarray]] = {}
        if said:
            states_of, prompts_of = encoded[[rows[r][0] for r in said]], [prompts[r] for r in said]
            decoded = teacher.greedy(states_of, prompts_of, [rows[r][3] for r in said], options.top_k, limit)
            results.update(zip(said, decoded, strict=True))
        if read:
            texts = [teacher.text(windows[rows[r][1]].parts[0], windows[rows[r][1]].language) for r in read]
            states_of, prompts_of = encoded[[rows[r][0] for r in read]], [prompts[r] for r in read]
            results.update(zip(read, teacher.forced(states_of, prompts_of, texts, options.top_k, limit), strict=True))
        for r, ((_, i, task, ts), prompt) in enumerate(zip(rows, prompts, strict=True)):
            tokens, ids = results[r]
            records.append({"window": i, "task": task, "timestamps": ts, "prompt_length": len(prompt)})
            flat_tokens.append(np.asarray(tokens, np.int32))
            flat_ids.append(ids)
    states.flush()
    np.savez(
        directory / "targets.npz",
        token_lengths=np.asarray([len(t) for t in flat_tokens]),
        tokens=np.concatenate(flat_tokens),
        topk_ids=np.concatenate(flat_ids),
    )
    (directory / "targets.json").write_text(json.dumps(records))
    (directory / "windows.json").write_text(json.dumps([asdict(w) for w in windows], indent=1))


def load_draft_data(directory: Path) -> DraftData:
    """Read a corpus written by :func:`draft_data` (encoder states memory-mapped)."""
    directory = Path(directory)
    windows = [
        Window(**{**w, "parts": tuple(w["parts"])}) for w in json.loads((directory / "windows.json").read_text())
    ]
    arrays = np.load(directory / "targets.npz")
    token_ends = np.cumsum(arrays["token_lengths"])
    targets = []
    position = 0
    for record, end, length in zip(
        json.loads((directory / "targets.json").read_text()), token_ends, arrays["token_lengths"], strict=True
    ):
        tokens = arrays["tokens"][end - length : end]
        scored = length - record["prompt_length"]
        targets.append(
            Target(
                tokens=tokens,
                topk_ids=arrays["topk_ids"][position : position + scored],
                **record,
            )
        )
        position += scored
    states = np.load(directory / "states.npy", mmap_mode="r")
    return DraftData(directory, windows, states, targets)


def heldout_audio(data: DraftData) -> list[tuple[int, np.ndarray]]:
    """(window index, 16 kHz audio) of every held-out window, in window order."""
    with np.load(data.directory / HELDOUT_AUDIO_FILE) as stored:
        return sorted((int(name), stored[name].astype(np.float32)) for name in stored.files)


def draft_data(options: CorpusOptions, main: str) -> DraftData:
    """The corpus for ``main``, built on first use in ``cache_root()/draft-data/<key>``."""
    checkpoint = resolve_checkpoint(main)
    sources = _speech_sources(options)
    key = input_key("draft-data", checkpoint_identity(checkpoint), asdict(options), code_version(), sources)
    return load_draft_data(cached_dir("draft-data", key, lambda tmp: _build(options, checkpoint, tmp)))


def _speech_sources(options: CorpusOptions) -> dict:
    """What speech this machine has beyond the core prompts: part of a corpus's identity."""
    voices = options.use_asterisk and options.voice_windows
    return {
        "voices": {language: len(asterisk.other_voice(language)) for language in options.languages if voices},
        "espeak-ng": espeak_available(),
        "festival": {language: festival_voices(language) for language in options.languages if options.festival_share},
        "fortunes": {
            language: [(path.name, path.stat().st_size) for path in fortune_files(language)]
            for language in options.languages
        },
    }


# A digest of this module as imported: a change to how targets are made invalidates cached corpora,
# and a process keeps the key of the code it runs, whatever is edited on disk meanwhile.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def code_version() -> str:
    return _CODE_VERSION
