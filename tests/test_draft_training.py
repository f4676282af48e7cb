"""Draft training: data split and windows, the trimmed vocabulary, the training loop, the checkpoint
contract with the export, and (slow) a reduced real run of ``specwhisper-train-draft`` on base."""

from __future__ import annotations

import json
import logging
import platform
import random
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_export.repository import DRAFT_VOCAB_FILE, measured_acceptance
from specwhisper_training import asterisk, vocabulary
from specwhisper_training import cli as draft_cli
from specwhisper_training import data as draft_data
from specwhisper_training import train as draft_training
from specwhisper_training.data import Clip, CorpusOptions, DraftData, Target, Window
from specwhisper_training.evaluate import agreement, tokens_per_pass
from specwhisper_training.model import TrimmedDraft, loss, make_batch
from specwhisper_training.options import DRAFT_PRESETS, DRAFT_RECIPES, PRESET_RECIPES, DraftTrainingOptions
from specwhisper_training.train import main_hidden_states, train
from specwhisper_training.vocabulary import coverage, draft_vocabulary
from tests.toy_model import tiny_config

VOCAB, EOT, WIDTH, FRAMES = 300, 250, 64, 40  # ids >= EOT play the specials


def test_options_refuse_what_cannot_train():
    with pytest.raises(ValueError):
        DraftTrainingOptions(layers=())
    with pytest.raises(ValueError):
        DraftTrainingOptions(steps=10, warmup_steps=20)
    with pytest.raises(ValueError):
        DraftTrainingOptions(ce_weight=0, kd_weight=0, hidden_weight=0)
    with pytest.raises(ValueError):
        DraftTrainingOptions(hidden_weight=-1)
    with pytest.raises(ValueError):
        DraftTrainingOptions(ema_decay=1.0)
    with pytest.raises(ValueError):
        CorpusOptions(min_seconds=20, max_seconds=10)
    with pytest.raises(ValueError, match="no built-in speech for \\['xx'\\]"):
        CorpusOptions(languages=("de", "xx"))
    with pytest.raises(ValueError, match="training_forms"):
        CorpusOptions(training_forms=5)
    with pytest.raises(ValueError, match="passage_words"):
        CorpusOptions(passage_words=(60, 15))


def test_the_command_trains_a_recipe_with_overrides_and_the_preset_by_default():
    def options(*argv: str) -> DraftTrainingOptions:
        return draft_cli.options_from(draft_cli.build_parser().parse_args(list(argv)))

    assert options() == DRAFT_PRESETS["base"] == DRAFT_RECIPES[PRESET_RECIPES["base"]]
    three = options("--recipe", "en-es-fr")
    assert three == DRAFT_RECIPES["en-es-fr"] and three.init is None and three.corpus.languages == ("en", "es", "fr")
    multilingual = options("--recipe", "multilingual")
    assert multilingual.corpus.languages == draft_data.MULTILINGUAL and multilingual.corpus.catalog_windows == 12
    assert (multilingual.init, multilingual.learning_rate) == ("en-es-fr", 3e-4)
    fewer = options("--recipe", "multilingual", "--languages", "de", "it", "--catalog-windows", "3", "--init", "none")
    assert fewer.corpus.languages == ("de", "it") and fewer.corpus.catalog_windows == 3
    assert fewer.corpus.fortune_windows == 16 and fewer.init is None
    with pytest.raises(SystemExit):
        options("--recipe", "klingon")


def test_a_recipe_start_is_trained_first_and_keyed_by_its_options(monkeypatch, tmp_path):
    """A draft that starts from a recipe's draft has that recipe trained (or taken from the cache) for the
    same main model; its cache key names the recipe by its options, without training it."""
    trained = []

    def fake_checkpoint(main, options):
        trained.append((main, options))
        (tmp_path / "config.json").write_text("{}")
        return tmp_path

    monkeypatch.setattr(draft_training, "draft_checkpoint", fake_checkpoint)
    assert draft_training.init_checkpoint("base", "en-es-fr") == tmp_path
    assert trained == [("base", DRAFT_RECIPES["en-es-fr"])]
    key = draft_training._started_from("base", "en-es-fr")
    assert key == ("recipe", asdict(DRAFT_RECIPES["en-es-fr"]), None) and len(trained) == 1


@pytest.mark.slow  # every catalog of the system: hundreds of thousands of messages
def test_program_messages_give_clean_sentences_in_every_language():
    """The gettext catalogs of the system's programs: text in each of Whisper's twenty largest
    languages, without format codes or menu markers."""
    for language in draft_data.MULTILINGUAL:
        texts = draft_data.catalog_texts(language)
        assert len(texts) >= 50, f"{language}: {len(texts)} messages"
        assert not any("%s" in text or "%d" in text or "\n" in text for text in texts), language
    train, held = draft_data.split_texts([f"t{i}" for i in range(10)], every=5)
    assert held == ["t4", "t9"] and set(train).isdisjoint(held) and len(train) == 8


def test_training_batches_take_the_languages_in_turn():
    windows = {"en": list(range(0, 30)), "de": [100, 101], "ko": [200, 201, 202]}
    batches = draft_training.balanced_batches(windows, 4, random.Random(0))
    seen = [next(batches) for _ in range(30)]
    languages = [w // 100 for batch in seen for w in batch]
    assert {language: languages.count(language) for language in (0, 1, 2)} == {0: 40, 1: 40, 2: 40}
    english = [w for batch in seen for w in batch if w < 100]
    assert sorted(english[:30]) == list(range(30)), "each pass goes through every window once"


def test_every_nth_file_per_language_is_held_out_and_never_trains():
    clips = [Clip(lang, f"{lang}/{i:03d}", Path(f"/x/{lang}{i}.wav")) for lang in ("en", "fr") for i in range(12)]
    random.Random(1).shuffle(clips)
    split = draft_data.split_by_file(clips, every=5)
    held = sorted(c.name for c in split["heldout"])
    assert held == ["en/004", "en/009", "fr/004", "fr/009"]
    assert not {c.name for c in split["train"]} & set(held)
    assert len(split["train"]) + len(held) == len(clips)


def test_windows_concatenate_distinct_clips_of_one_pool_within_bounds():
    lengths = {f"c{i}": (i % 7 + 1) * 8_000 for i in range(30)}  # 0.5 to 3.5 s
    clips = [Clip("en", name, Path(name)) for name in lengths]

    def load(clip: Clip) -> np.ndarray:
        return np.ones(lengths[clip.name], np.float32)

    def windows(seed: int) -> list[tuple[list[str], np.ndarray]]:
        return list(draft_data.concatenate(clips, 20, random.Random(seed), 5.0, 12.0, load))

    made = windows(0)
    assert len(made) == 20
    for names, audio in made:
        assert len(set(names)) == len(names) and set(names) <= set(lengths)
        assert len(audio) <= 12 * SAMPLE_RATE
        assert len(audio) >= 5 * SAMPLE_RATE or sum(lengths.values()) < 5 * SAMPLE_RATE
    assert [n for n, _ in made] == [n for n, _ in windows(0)]  # seeded
    assert [n for n, _ in made] != [n for n, _ in windows(1)]


def test_recombined_texts_only_use_training_words():
    texts = ["press one for sales", "please hold the line now", "goodbye"]
    words = {w for t in texts for w in t.split()}
    for seed in range(5):
        passage = draft_data.recombined_texts(texts, random.Random(seed))
        assert {w.strip(".,?!") for w in passage.split()} <= words


def test_missing_espeak_is_skipped_with_a_message(monkeypatch, caplog):
    monkeypatch.setattr(draft_data, "espeak_available", lambda: False)
    options = CorpusOptions(languages=("en",), train_windows=1, heldout_windows=1, espeak_windows=3, max_files=6)
    with caplog.at_level(logging.WARNING):
        made = list(draft_data.make_windows(options, teacher=None))
    assert [w.source for w, _ in made] == ["speech", "speech"]
    assert [w.split for w, _ in made] == ["train", "heldout"]
    assert "espeak-ng not found" in caplog.text


def test_a_second_voice_is_real_speech_of_the_same_prompts():
    """Debian's Colombian Spanish voice, fetched into the cache and read as raw GSM 6.10."""
    voice = dict(asterisk.other_voice("es"))
    core = {p.name: p for p in asterisk.prompts("es")}
    assert len(voice) > 200 and len(voice.keys() & core.keys()) > 200
    name = "agent-alreadyon"
    audio = asterisk.load_audio(voice[name])
    seconds = len(audio) / SAMPLE_RATE
    assert audio.dtype == np.float32 and 1.0 < seconds < 3 * core[name].seconds
    assert 0.1 < np.abs(audio).max() <= 1.0 and np.isfinite(audio).all()
    assert asterisk.other_voice("en") == ()


def test_a_voice_that_cannot_be_fetched_is_left_out_with_a_message(tmp_path, monkeypatch, caplog):
    """Without apt (or its package lists) training goes on without the second voice, and says so."""
    monkeypatch.setenv("SPECWHISPER_CACHE", str(tmp_path))
    monkeypatch.setattr(asterisk.os, "geteuid", lambda: 1000)  # not root: no apt-get update

    def no_apt(command, **kwargs):
        if kwargs.get("check"):
            raise subprocess.CalledProcessError(100, command)
        return subprocess.CompletedProcess(command, 100)

    monkeypatch.setattr(asterisk.subprocess, "run", no_apt)
    with caplog.at_level(logging.WARNING):
        assert asterisk.other_voice("fr") == ()
    assert "asterisk-prompt-fr-armelle" in caplog.text
    assert not (tmp_path / "voices" / "asterisk-prompt-fr-armelle").exists()  # nothing half-made is cached


def test_a_second_voice_never_reads_a_heldout_prompt():
    options = CorpusOptions(
        languages=("es",), train_windows=0, heldout_windows=0, voice_windows=6, espeak_windows=0, fortune_windows=0
    )
    heldout = draft_data.split_by_file(draft_data._clips(options, None), options.heldout_every)["heldout"]
    held = {c.prompt for c in heldout}
    voice = draft_data._other_voices(options, heldout)
    assert voice and not {c.prompt for c in voice} & held
    assert len(voice) < len(asterisk.other_voice("es"))  # the held-out prompts' readings are left out
    made = list(draft_data.make_windows(options, teacher=None))
    assert len(made) == 6 and {(w.split, w.source) for w, _ in made} == {("train", "speech")}
    for window, _ in made:
        assert all(part.startswith("asterisk-prompt-es-co/") for part in window.parts)
        assert not {part.split("/", 1)[1] for part in window.parts} & held


def test_the_heldout_set_does_not_depend_on_what_trains():
    """Held-out windows and their prompt forms stay the same whatever the training split is made of,
    so drafts trained on different corpora are compared on the same recordings."""

    def heldout(options: CorpusOptions) -> list[Window]:
        return [w for w, _ in draft_data.make_windows(options, teacher=None) if w.split == "heldout"]

    corpus = {"languages": ("es",), "heldout_windows": 4, "espeak_windows": 0, "fortune_windows": 0}
    fewer, more = (CorpusOptions(**corpus, train_windows=n, voice_windows=0) for n in (1, 5))
    assert heldout(fewer) == heldout(more) and len(heldout(more)) == 4
    assert heldout(CorpusOptions(**corpus, train_windows=1, voice_windows=0, seed=1)) != heldout(fewer)

    def forms(windows: list[Window]) -> list:
        return [
            f for w, f in zip(windows, draft_data.prompt_forms(windows, seed=0), strict=True) if w.split == "heldout"
        ]

    held = [Window("es", "heldout", "speech", (f"h{i}",), 5.0) for i in range(12)]
    trains = [Window("es", "train", "speech", (f"t{i}",), 5.0) for i in range(12)]
    interleaved = [w for pair in zip(trains, held, strict=True) for w in pair]
    assert forms(held) == forms(interleaved) == forms([*trains[:3], *held])
    assert all(f[0] == draft_data.DEFAULT_FORM for f in forms(held)) and len({f[1] for f in forms(held)}) > 1


@pytest.mark.parametrize("count", [1, 2, 4])
def test_training_windows_are_decoded_in_distinct_forms_held_out_ones_in_two(count):
    windows = [Window("es", split, "speech", (f"{split}{i}",), 5.0) for i in range(6) for split in ("train", "heldout")]
    forms = draft_data.prompt_forms(windows, seed=0, training_forms=count)
    for window, chosen in zip(windows, forms, strict=True):
        assert chosen[0] == draft_data.DEFAULT_FORM and len(set(chosen)) == len(chosen)
        assert len(chosen) == (count if window.split == "train" else 2)
    assert forms[1::2] == draft_data.prompt_forms(windows, seed=0)[1::2]


@pytest.mark.skipif(not draft_data.espeak_available(), reason="espeak-ng is not installed")
def test_espeak_speaks_each_language():
    for language, voices in draft_data.ESPEAK_VOICES.items():
        audio = draft_data.synthesize("uno dos tres" if language != "en" else "one two three", voices[0], 170, 50)
        assert audio.dtype == np.float32 and 0.5 * SAMPLE_RATE < len(audio) < 5 * SAMPLE_RATE, language
        assert np.abs(audio).max() > 0.05


def test_festival_reads_its_share_of_the_windows_and_espeak_the_rest(monkeypatch):
    festival, espeak = np.full(16_000, 0.5, np.float32), np.full(8_000, -0.5, np.float32)  # told apart by sign
    read: list[tuple[str, str, str]] = []

    def by_festival(text, voice, encoding, stretch):
        read.append((text, voice, encoding))
        assert 0.85 <= stretch <= 1.2
        return None if text == "refused" else festival

    monkeypatch.setattr(draft_data, "festival_voices", lambda language: [("russian/voice", "utf-8")])
    monkeypatch.setattr(draft_data, "festival_speech", by_festival)
    monkeypatch.setattr(draft_data, "synthesize", lambda *args, **kwargs: espeak)

    def readers(share: float, text: str = "текст") -> list[str]:
        spoken = draft_data.spoken_windows(lambda rng: text, "ru", 40, random.Random(0), 25.0, share)
        return ["festival" if audio[0] > 0 else "espeak" for _, audio in spoken]

    assert set(readers(0.0)) == {"espeak"} and not read
    assert set(readers(1.0)) == {"festival"} and read[0] == ("текст", "russian/voice", "utf-8")
    assert 10 <= readers(0.5).count("festival") <= 30
    assert set(readers(1.0, "refused")) == {"espeak"}  # a text Festival cannot read falls back


def test_a_share_of_synthetic_windows_is_heard_through_a_telephones_band(monkeypatch):
    seconds = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    speech, whistle = np.sin(2 * np.pi * 1000 * seconds), np.sin(2 * np.pi * 6000 * seconds)
    monkeypatch.setattr(draft_data, "synthesize", lambda *args, **kwargs: (speech + whistle).astype(np.float32))

    def spectrum(audio: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.rfft(audio))  # one second: 1 Hz bins

    def narrowed(share: float) -> list[bool]:
        spoken = draft_data.spoken_windows(lambda rng: "text", "en", 40, random.Random(0), 25.0, 0.0, share)
        kept = []
        for _, audio in spoken:
            assert audio.dtype == np.float32 and len(audio) == SAMPLE_RATE
            bins = spectrum(audio)
            assert bins[1000] > 0.9 * spectrum(speech)[1000]  # the speech band stays
            kept.append(bool(bins[6000] < 0.01 * spectrum(whistle)[6000]))
        return kept

    assert not any(narrowed(0.0))
    assert all(narrowed(1.0))
    assert 10 <= sum(narrowed(0.5)) <= 30
    with pytest.raises(ValueError, match="narrowband_share"):
        draft_data.CorpusOptions(languages=("ru",), narrowband_share=1.5)


@pytest.mark.skipif(not draft_data.festival_voices("ru"), reason="Festival or its Russian voice is not installed")
def test_festival_speaks_each_language_it_has_a_voice_for():
    texts = {"ru": "Привет, как дела?", "it": "Buongiorno, città!", "fi": "Hyvää päivää!", "ca": "Bon dia, què tal?"}
    for language, text in texts.items():
        for voice, encoding in draft_data.festival_voices(language):
            audio = draft_data.festival_speech(text + " «»", voice, encoding, 1.0)  # symbols are left out
            assert audio is not None and audio.dtype == np.float32, voice
            assert 0.5 * SAMPLE_RATE < len(audio) < 6 * SAMPLE_RATE, voice
            assert np.abs(audio).max() > 0.05, voice


def test_fortunes_are_prose_without_attributions_or_art(tmp_path, monkeypatch):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "wisdom").write_text(
        "A stitch in time saves nine, or so they say.\n\t\t-- Someone Famous,\n\t\tin a book\n%\n"
        "  ___    ___\n |___|  |___|  |_|  |_|  |_|  |_|  |_|\n%\nShort.\n%\n"
        "The early bird catches the worm,\nbut the second mouse gets the cheese.\n"
    )
    (folder / "wisdom.dat").write_bytes(b"\x00\x01")
    (folder / "wisdom.u8").symlink_to(folder / "wisdom")
    monkeypatch.setitem(draft_data.FORTUNE_FOLDERS, "en", folder)
    assert draft_data.fortune_texts("en") == [
        "A stitch in time saves nine, or so they say.",
        "The early bird catches the worm, but the second mouse gets the cheese.",
    ]
    assert draft_data.fortune_texts("fr") == []
    # The corpus key names the files (and sizes) rather than parsing them on every lookup.
    assert draft_data.fortune_files("en") == [folder / "wisdom"]


def test_fortunes_other_packages_put_in_the_english_folder_are_read_as_their_language(tmp_path, monkeypatch):
    # fortunes-br and fortunes-zh install into the folder of the English fortunes.
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "wisdom").write_text("The early bird catches the worm, but the second mouse gets the cheese.\n")
    (folder / "brasil").write_text("Porque a galinha atravessa a rua? Porque o upstream mandou!\n")
    (folder / "chinese").write_text("\x1b[33m    -- Debian\x1b[m\n")
    monkeypatch.setattr(draft_data, "FORTUNES", folder)
    monkeypatch.setitem(draft_data.FORTUNE_FOLDERS, "en", folder)
    assert draft_data.fortune_files("en") == [folder / "wisdom"]
    assert draft_data.fortune_texts("pt") == ["Porque a galinha atravessa a rua? Porque o upstream mandou!"]
    assert draft_data.fortune_files("zh") == []


def test_fortune_passages_join_whole_fortunes_up_to_a_length():
    texts = ["one two three four five.", "six seven eight.", "nine ten eleven twelve thirteen fourteen."]
    for seed in range(20):
        for fewest, most in ((15, 60), (70, 90)):
            passage = draft_data.fortune_passage(texts, random.Random(seed), words=(fewest, most))
            # at least the words drawn, and at most one fortune (six words here) beyond the most
            assert fewest <= len(passage.split()) < most + 6
            rest = passage
            while rest:  # whole fortunes only, one after another
                rest = next(rest[len(t) :].lstrip() for t in texts if rest.startswith(t))


def test_installed_fortunes_give_english_and_spanish_prose():
    """.ci/setup installs Debian's fortunes and fortunes-es: thousands of passages each."""
    for language in ("en", "es"):
        assert len(draft_data.fortune_texts(language)) > 5000, f"apt-get install {language} fortunes"


def _target(window: int, tokens: list[int], prompt_length: int, top: int = 4) -> Target:
    text = np.asarray(tokens[prompt_length:], np.int32)
    others = (text[:, None] + np.arange(1, top)[None, :]) % EOT
    return Target(
        window=window,
        task="transcribe",
        timestamps=False,
        prompt_length=prompt_length,
        tokens=np.asarray(tokens, np.int32),
        topk_ids=np.concatenate([text[:, None], others], axis=1).astype(np.int32),
    )


def test_vocabulary_keeps_specials_frequent_merges_and_what_the_main_model_said():
    targets = [_target(0, [EOT + 1, EOT + 2, 120, 7, 199, EOT], 2)]
    ids = draft_vocabulary(targets, VOCAB, first_special=EOT, rank_floor=10)
    assert list(ids) == sorted({*range(10), 120, 199, *range(EOT, VOCAB)})
    assert coverage(targets, ids) == 1.0
    assert coverage(targets, ids[ids != 199]) == 3 / 4
    alternatives = draft_vocabulary(targets, VOCAB, first_special=EOT, rank_floor=10, teacher_top_k=2)
    assert set(alternatives) - set(ids) == {121, 200}  # runners-up (_target: id + 1) not kept already


def test_prose_lexicon_keeps_the_ids_prose_uses_often():
    """Text is tokenised as Whisper writes it (after a space); ids under the count add nothing."""
    seen = []

    def tokenizer(texts, add_special_tokens):
        seen.extend(texts)
        return {"input_ids": [[ord(word) for word in text.split()] for text in texts]}  # one-letter words

    lexicon = vocabulary.prose_lexicon(tokenizer, ["a b", "b c", "b", "c"], min_count=2)
    assert list(lexicon) == [ord("b"), ord("c")] and seen == [" a b", " b c", " b", " c"]
    assert list(vocabulary.prose_lexicon(tokenizer, ["a b"], min_count=0)) == []
    targets = [_target(0, [EOT + 1, 7, EOT], 1)]
    assert {ord("b"), ord("c")} < set(draft_vocabulary(targets, VOCAB, EOT, 0, lexicon=lexicon))
    assert vocabulary.text_coverage(tokenizer, ["b c", "a"], lexicon) == 2 / 3


def test_the_lexicons_prose_is_the_training_split_of_fortunes_and_program_messages(monkeypatch):
    """In a language held out on texts, every 5th fortune and message is never counted; in one held out
    on recordings, all of them are."""
    fortunes = {lang: [f"{lang} fortune {i}" for i in range(10)] for lang in ("en", "de")}
    messages = {lang: [f"{lang} message {i}" for i in range(5)] for lang in ("en", "de")}
    monkeypatch.setattr(draft_data, "fortune_texts", lambda language: fortunes[language])
    monkeypatch.setattr(draft_data, "catalog_texts", lambda language: messages[language])
    prose = draft_data.training_prose(draft_data.CorpusOptions(languages=("en", "de")))
    held = {"de fortune 4", "de fortune 9", "de message 4"}
    assert set(prose) == set(fortunes["en"] + messages["en"] + fortunes["de"] + messages["de"]) - held
    options = draft_data.CorpusOptions(languages=("en", "de"))
    assert set(draft_data.heldout_prose(options, "de")) == held and draft_data.heldout_prose(options, "en") == []


def test_the_report_leaves_out_texts_whisper_would_not_keep_as_too_repetitive():
    """Whisper's gate (gzip ratio over 2.4) on the text without specials or timestamps."""

    class Words:
        def decode(self, ids):
            assert all(i < EOT for i in ids), "specials and timestamps are not text"
            return " ".join("".join(chr(97 + (i * i * 7 + k * 13) % 26) for k in range(3 + i % 5)) for i in ids)

    prompt = [EOT + 1, EOT + 2]
    loop = _target(0, [*prompt, *([5, 6] * 40), EOT], len(prompt))
    varied = _target(0, [*prompt, EOT + 10, *range(20, 60), EOT + 20, EOT], len(prompt))
    assert draft_data.REPETITIVE == 2.4
    assert draft_data.repetitive(Words(), loop, EOT)
    assert not draft_data.repetitive(Words(), varied, EOT)


def test_tokens_per_pass_follows_speculative_rounds():
    assert tokens_per_pass(np.ones(10, bool), 4) == (10, 2)  # 4 drafts + 1 own token a round
    assert tokens_per_pass(np.zeros(6, bool), 4) == (6, 6)  # one token a pass, as without a draft
    # K=2: [hit, miss] -> 1 accepted + own (2 tokens); [hit, hit] -> 2 + own ends the text.
    assert tokens_per_pass(np.asarray([1, 0, 1, 1, 1], bool), 2) == (5, 2)


@pytest.fixture(scope="module")
def tiny_main():
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        encoder_layers=1,
        max_source_positions=FRAMES,
        max_target_positions=64,
        decoder_start_token_id=EOT + 1,
        pad_token_id=EOT,
        eos_token_id=EOT,
        bos_token_id=EOT,
    )
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture
def tiny_data(tmp_path) -> DraftData:
    """Four training windows, each decoded in two prompt forms, with random 'encoder states'."""
    rng = np.random.default_rng(0)
    windows = [Window("en", "train", "speech", (f"w{i}",), 5.0) for i in range(4)]
    targets = []
    for window in range(4):
        for task_token in (EOT + 3, EOT + 4):
            text = rng.integers(20, 120, size=12).tolist()
            targets.append(_target(window, [EOT + 1, EOT + 2, task_token, *text, EOT], 3))
    states = rng.standard_normal((4, FRAMES, WIDTH)).astype(np.float16)
    return DraftData(tmp_path, windows, states, targets)


def test_batches_read_the_encoder_frames_the_engine_serves(tiny_data):
    """As the engine cuts a draft's encoder states: the longest window's audio, then the margin.
    Toy encoder: 40 frames per 30 s, so 5 s of audio is ceil(500 x 40 / 3000) = 7 frames."""
    to_trimmed = np.arange(VOCAB)
    assert make_batch(tiny_data, tiny_data.targets[:4], to_trimmed, frames_after_audio=3).states.shape[1] == 10
    assert make_batch(tiny_data, tiny_data.targets[:4], to_trimmed, frames_after_audio=500).states.shape[1] == FRAMES


def test_the_label_at_each_position_is_what_the_main_model_would_say_there(tiny_data):
    """A greedy target's next token is the main model's first choice; a forced (spoken) one's need not
    be, and the draft learns the main model's choice, not the text forced on it."""
    decoded = tiny_data.targets[0]
    forced = replace(decoded, topk_ids=np.roll(decoded.topk_ids, 1, axis=1))
    to_trimmed = np.arange(VOCAB)
    labels = make_batch(tiny_data, [decoded, forced], to_trimmed, frames_after_audio=3).next_ids.numpy()
    np.testing.assert_array_equal(labels[: len(decoded.text_tokens)], decoded.text_tokens)
    np.testing.assert_array_equal(labels[len(decoded.text_tokens) :], forced.topk_ids[:, 0])
    assert (forced.topk_ids[:, 0] != forced.text_tokens).all()


def test_only_whole_synthetic_training_readings_in_the_default_form_are_spoken_targets():
    options = CorpusOptions(spoken_targets=True, max_seconds=25.0)
    read = Window("ru", "train", "espeak", ("текст",), 12.0)
    assert draft_data.spoken_target(read, options, draft_data.DEFAULT_FORM)
    assert not draft_data.spoken_target(read, options, ("transcribe", True))  # its timestamps are unknown
    assert not draft_data.spoken_target(read, options, ("translate", False))
    assert not draft_data.spoken_target(replace(read, seconds=25.0), options, draft_data.DEFAULT_FORM)  # cut short
    assert not draft_data.spoken_target(replace(read, split="heldout"), options, draft_data.DEFAULT_FORM)
    assert not draft_data.spoken_target(replace(read, source="speech"), options, draft_data.DEFAULT_FORM)


def test_main_hidden_states_are_the_main_decoders_own_at_each_scored_position(tiny_main, tiny_data):
    """What the draft is taught to reach: the main decoder's final hidden state (transformers' own
    forward, all encoder frames) at the positions that predict each target's text, window by window."""
    hidden = main_hidden_states(tiny_main, tiny_data, tiny_data.targets)
    assert sorted(hidden) == [0, 1, 2, 3]
    for window in hidden:
        expected = []
        for target in (t for t in tiny_data.targets if t.window == window):
            with torch.no_grad():
                states = torch.from_numpy(tiny_data.states[window : window + 1].astype(np.float32))
                out = tiny_main.model.decoder(
                    input_ids=torch.from_numpy(target.tokens[None, :-1].astype(np.int64)),
                    encoder_hidden_states=states,
                ).last_hidden_state[0]
            expected.append(out[target.prompt_length - 1 :])
        np.testing.assert_allclose(hidden[window], torch.cat(expected).numpy(), atol=5e-3, rtol=5e-3)


def test_a_draft_with_all_the_main_layers_is_at_zero_hidden_distance(tiny_main, tiny_data):
    """The hidden-state term measures distance to the main model: none for the main decoder itself,
    and some for a draft cut to fewer layers."""
    ids = draft_vocabulary(tiny_data.targets, VOCAB, EOT, rank_floor=16)
    hidden = main_hidden_states(tiny_main, tiny_data, tiny_data.targets)
    targets = [t for t in tiny_data.targets if t.window == 0]
    whole_draft, cut_draft = (TrimmedDraft.from_main(tiny_main, layers, ids) for layers in ((0, 1, 2), (0, 2)))
    batch = make_batch(tiny_data, targets, whole_draft.trimmed_index(), FRAMES)
    teacher = torch.from_numpy(hidden[0].astype(np.float32))
    only_distance = DraftTrainingOptions(ce_weight=0, kd_weight=0, hidden_weight=1)
    with torch.no_grad():
        whole = loss(whole_draft, batch, teacher, only_distance)
        cut = loss(cut_draft, batch, teacher, only_distance)
    assert whole.item() < 1e-5 < 0.01 < cut.item(), (whole.item(), cut.item())


def test_training_fits_the_main_models_outputs(tiny_main, tiny_data):
    """The loop, the cross-entropy and agreement work together: a few windows are learnt by heart,
    while the head stays the main model's output projection rows. The toy labels are random, not
    what the tiny main model says, so its own terms are off here."""
    ids = draft_vocabulary(tiny_data.targets, VOCAB, EOT, rank_floor=16)
    draft = TrimmedDraft.from_main(tiny_main, (0, 2), ids)
    head = draft.head.detach().clone()
    before = np.concatenate(agreement(draft, tiny_data, tiny_data.targets)).mean()
    options = DraftTrainingOptions(
        steps=80,
        batch_windows=2,
        learning_rate=3e-3,
        warmup_steps=5,
        kd_weight=0,
        hidden_weight=0,
        ema_decay=0,  # the last weights: a moving average over 80 toy steps lags behind them
    )
    losses = train(draft, tiny_data, main_hidden_states(tiny_main, tiny_data, tiny_data.targets), options)
    after = np.concatenate(agreement(draft, tiny_data, tiny_data.targets)).mean()
    assert before < 0.2 and after > 0.9, (before, after)
    assert torch.equal(draft.head, head)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    embedding = tiny_main.model.decoder.embed_tokens.weight
    assert torch.equal(draft.model.model.decoder.embed_tokens.weight, embedding)  # frozen copy


def test_training_brings_the_draft_to_the_main_models_hidden_state(tiny_main, tiny_data):
    """With only the hidden-state term, the loop moves a 1-layer draft toward the main model's
    final hidden state."""
    ids = draft_vocabulary(tiny_data.targets, VOCAB, EOT, rank_floor=16)
    draft = TrimmedDraft.from_main(tiny_main, (1,), ids)
    hidden = main_hidden_states(tiny_main, tiny_data, tiny_data.targets)
    options = DraftTrainingOptions(
        steps=60, batch_windows=2, learning_rate=3e-3, warmup_steps=5, ce_weight=0, kd_weight=0, hidden_weight=1
    )
    losses = train(draft, tiny_data, hidden, options)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])


def test_training_on_some_targets_draws_every_batch_from_their_windows(tiny_main, tiny_data, monkeypatch):
    """What ``leave_out_loops`` relies on: the targets left out are never trained on."""
    kept = [t for t in tiny_data.targets if t.window in (1, 3)]
    seen = []
    real_batch = draft_training.make_batch

    def recording(data, targets, *args):
        seen.extend(t.window for t in targets)
        return real_batch(data, targets, *args)

    draft = TrimmedDraft.from_main(tiny_main, (1,), draft_vocabulary(tiny_data.targets, VOCAB, EOT, rank_floor=16))
    hidden = main_hidden_states(tiny_main, tiny_data, kept)
    monkeypatch.setattr(draft_training, "make_batch", recording)
    train(draft, tiny_data, hidden, DraftTrainingOptions(steps=6, batch_windows=2, warmup_steps=1), kept)
    assert set(seen) == {1, 3} and len(seen) == 6 * 2 * 2  # 2 windows a step, 2 forms each


@pytest.mark.parametrize("decay", [0.0, 0.8])
def test_the_kept_draft_is_the_moving_average_of_the_weights_after_warm_up(tiny_main, tiny_data, decay):
    """``ema_decay``: the draft kept averages the weights after each step from warm-up's end on
    (0: the last step's weights), as recorded step by step here."""
    ids = draft_vocabulary(tiny_data.targets, VOCAB, EOT, rank_floor=16)
    draft = TrimmedDraft.from_main(tiny_main, (0, 2), ids)
    trained = [p for p in draft.parameters() if p.requires_grad]
    after_each_step = []
    hook = register_optimizer_step_post_hook(lambda *_: after_each_step.append([p.detach().clone() for p in trained]))
    options = DraftTrainingOptions(steps=12, batch_windows=2, learning_rate=3e-3, warmup_steps=4, ema_decay=decay)
    try:
        train(draft, tiny_data, main_hidden_states(tiny_main, tiny_data, tiny_data.targets), options)
    finally:
        hook.remove()
    expected = after_each_step[options.warmup_steps]
    for weights in after_each_step[options.warmup_steps + 1 :]:
        expected = [decay * kept + (1 - decay) * new for kept, new in zip(expected, weights, strict=True)]
    assert len(after_each_step) == options.steps
    for kept, average, last in zip(trained, expected, after_each_step[-1], strict=True):
        torch.testing.assert_close(kept.detach(), average)
        assert torch.equal(kept.detach(), last) == (decay == 0)


class _NoProcessor:
    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "processor.marker").write_text("")


def test_checkpoint_is_a_full_vocabulary_model_with_the_trained_rows(tiny_main, tmp_path):
    ids = np.asarray([3, 5, 40, *range(EOT, VOCAB)])
    draft = TrimmedDraft.from_main(tiny_main, (1,), ids)
    with torch.no_grad():
        draft.head.add_(torch.randn_like(draft.head))
    draft.save(tmp_path, _NoProcessor())

    assert json.loads((tmp_path / DRAFT_VOCAB_FILE).read_text()) == {"token_ids": ids.tolist()}
    saved = WhisperForCausalLM.from_pretrained(tmp_path)
    embedding = tiny_main.model.decoder.embed_tokens.weight
    assert torch.equal(saved.proj_out.weight[ids], draft.head)
    others = np.setdiff1d(np.arange(VOCAB), ids)
    assert torch.equal(saved.proj_out.weight[others], embedding[others])
    assert torch.equal(saved.model.decoder.embed_tokens.weight, embedding)  # not tied to the head

    reloaded = TrimmedDraft.load(tmp_path)
    tokens = torch.tensor([[EOT + 1, 3, 40, 5]])
    states = torch.randn(1, FRAMES, WIDTH)
    where = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        expected = draft.logits(tokens, states, torch.zeros(1, dtype=torch.int64), where)
        got = reloaded.logits(tokens, states, torch.zeros(1, dtype=torch.int64), where)
    torch.testing.assert_close(got, expected)


def test_a_widened_head_adds_the_main_models_rows_and_scores_the_old_ids_as_before(tiny_main, tmp_path):
    """Widening is untrained: the new ids score by the main model's own output rows, the old ones as
    the trained draft did, and the record says the head grew."""
    ids = np.asarray([3, 5, 40, *range(EOT, VOCAB)])
    trained = TrimmedDraft.from_main(tiny_main, (1,), ids)
    with torch.no_grad():
        for parameter in trained.model.model.decoder.layers.parameters():
            parameter.add_(torch.randn_like(parameter))
    trained.save(tmp_path / "trained", _NoProcessor())
    record = {"vocabulary": len(ids), "heldout_coverage": 0.9, "final_loss": 1.0}
    (tmp_path / "trained" / draft_training.TRAINING_FILE).write_text(json.dumps(record))

    widened_record = draft_training.widen_head(
        tmp_path / "trained", np.asarray([5, 7, 41]), tmp_path / "wide", _NoProcessor()
    )
    wide = TrimmedDraft.load(tmp_path / "wide")
    assert wide.token_ids.tolist() == sorted({*ids.tolist(), 7, 41})
    assert torch.equal(wide.head, tiny_main.proj_out.weight[wide.token_ids])
    assert widened_record == {
        "vocabulary": len(ids) + 2,
        "final_loss": 1.0,
        "widened_head": {"from": len(ids), "lexicon": 3},
    }
    assert json.loads((tmp_path / "wide" / draft_training.TRAINING_FILE).read_text()) == widened_record

    tokens, states = torch.tensor([[EOT + 1, 3, 40, 5]]), torch.randn(1, FRAMES, WIDTH)
    rows, where = torch.zeros(1, dtype=torch.int64), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        before, after = trained.logits(tokens, states, rows, where), wide.logits(tokens, states, rows, where)
    torch.testing.assert_close(after[:, np.searchsorted(wide.token_ids.numpy(), ids)], before)


def test_a_warm_start_takes_a_trained_drafts_decoder_and_this_trainings_head(tiny_main, tiny_data, tmp_path):
    trained = TrimmedDraft.from_main(tiny_main, (0, 1), np.asarray([3, 5, *range(EOT, VOCAB)]))
    with torch.no_grad():
        for parameter in trained.model.model.decoder.layers.parameters():
            parameter.add_(torch.randn_like(parameter))
    trained.save(tmp_path / "trained", _NoProcessor())

    ids = np.asarray([3, 7, 40, *range(EOT, VOCAB)])  # another vocabulary
    draft = TrimmedDraft.from_main(tiny_main, (0, 1), ids)
    draft_training.warm_start(draft, tmp_path / "trained")
    ours, theirs = draft.model.state_dict(), trained.model.state_dict()
    for name, value in theirs.items():
        if name != "model.decoder.embed_tokens.weight":
            torch.testing.assert_close(ours[name], value, msg=name)
    assert torch.equal(draft.head, tiny_main.proj_out.weight[torch.as_tensor(ids)])
    assert torch.equal(ours["model.decoder.embed_tokens.weight"], tiny_main.model.decoder.embed_tokens.weight)

    with pytest.raises(ValueError, match="1 layers"):
        draft_training.warm_start(TrimmedDraft.from_main(tiny_main, (1,), ids), tmp_path / "trained")
    with pytest.raises(FileNotFoundError, match="not a draft checkpoint"):
        draft_training.init_checkpoint("base", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no draft called 'nonesuch'"):
        draft_training.init_checkpoint("base", "shipped:nonesuch")
    options = draft_cli.options_from(
        draft_cli.build_parser().parse_args(["--init", "shipped", "--learning-rate", "1e-4", "--max-seconds", "29"])
    )
    assert (options.init, options.learning_rate, options.corpus.max_seconds) == ("shipped", 1e-4, 29.0)
    assert options.corpus.passage_words == (15, 60)
    args = draft_cli.build_parser().parse_args(["--passage-words", "20", "90"])
    assert draft_cli.options_from(args).corpus.passage_words == (20, 90)
    with pytest.raises(ValueError, match="max_seconds <= 29"):
        draft_cli.options_from(draft_cli.build_parser().parse_args(["--max-seconds", "30"]))


@pytest.mark.slow
def test_reduced_run_of_the_command_beats_an_untrained_cut(tmp_path, capsys, monkeypatch, base):
    """End to end on base: few files, few steps; the report is printed, and on held-out windows the
    trained draft agrees with base more often than the same layers cut and left untrained."""
    out = tmp_path / "draft"
    argv = ["--main", "base", "--recipe", "en-es-fr", "--out", str(out), "--max-files", "15", "--train-windows", "4"]
    argv += ["--voice-windows", "2", "--espeak-windows", "2", "--fortune-windows", "2", "--heldout-windows", "2"]
    argv += ["--steps", "16", "--engine-windows", "1", "--languages", "en", "es", "fr"]
    assert draft_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tok/pass" in printed and "draft token" in printed
    assert f"--route en,es,fr={out}" in printed, "how to serve a draft trained for some languages"
    # Its engine figures stay with it, so that serving it unpacked starts from them.
    kept = measured_acceptance(str(out))
    assert set(kept) == {"en", "es", "fr"} and all(0.0 <= value <= 1.0 for value in kept.values())
    assert "measured acceptance kept in" in printed
    for language, value in kept.items():
        assert f"{value:.1%}" in next(line for line in printed.splitlines() if line.startswith(f"{language} "))

    args = draft_cli.build_parser().parse_args(argv)
    options = draft_cli.options_from(args)
    data = draft_data.draft_data(options.corpus, "base")
    heldout = data.split("heldout")
    trained = TrimmedDraft.load(out)
    untrained = TrimmedDraft.from_main(base[0], options.layers, trained.token_ids.numpy())
    trained_rate = np.concatenate(agreement(trained, data, heldout)).mean()
    untrained_rate = np.concatenate(agreement(untrained, data, heldout)).mean()
    print(f"held-out agreement: trained {trained_rate:.1%}, untrained cut {untrained_rate:.1%}")
    assert trained_rate > untrained_rate + 0.1
    assert {"config.json", "model.safetensors", "tokenizer.json", DRAFT_VOCAB_FILE} <= {p.name for p in out.iterdir()}

    # Packing a checkpoint names the languages it trained on as its route, whatever the recipe given.
    weights, record_file = tmp_path / "x.safetensors", tmp_path / "x.json"
    weights.write_bytes(b"weights")
    record_file.write_text('{"heldout": {}}')
    monkeypatch.setattr(draft_cli, "pack", lambda main, checkpoint, record, name: (weights, record_file))
    assert draft_cli.main(["--recipe", "multilingual", "--checkpoint", str(out), "--pack", "x", "--no-report"]) == 0
    assert "now routes en,es,fr to it" in capsys.readouterr().out


@pytest.mark.slow
def test_the_teachers_batch_decodes_each_prompt_as_alone(english_clips):
    """Rows that end early leave the batch; the others go on exactly as if decoded one by one."""
    teacher = draft_data.MainTeacher("base")
    audio = [clip for _, clip in english_clips[:3]]
    states = teacher.model.encode(np.concatenate([teacher.features(a) for a in audio]))
    forms = [("transcribe", False), ("translate", True), ("transcribe", True)]
    prompts = [teacher.prompt("en", task, ts) for task, ts in forms]
    stamps = [ts for _, ts in forms]
    together = teacher.greedy(states, prompts, stamps, top_k=4, limit=120)
    assert len({len(tokens) for tokens, _ in together}) > 1, "rows should end at different steps"
    for row, (tokens, ids) in enumerate(together):
        one = slice(row, row + 1)
        alone, alone_ids = teacher.greedy(states[one], prompts[one], stamps[one], top_k=4, limit=120)[0]
        assert tokens == alone and tokens[-1] == teacher.facts.tokens.eot
        assert ids.shape == (len(tokens) - len(prompts[row]), 4)
        np.testing.assert_array_equal(ids[:, 0], alone_ids[:, 0])


@pytest.mark.slow
def test_a_forced_reading_scores_each_position_as_greedy_decoding_does(english_clips):
    """Forced on its own greedy text, the main model's likeliest ids at each position are the ones its
    decoding chose; a text longer than the limit is cut there, without end of text."""
    teacher = draft_data.MainTeacher("base")
    audio = [clip for _, clip in english_clips[:2]]
    states = teacher.model.encode(np.concatenate([teacher.features(a) for a in audio]))
    prompts = [teacher.prompt("en", "transcribe", False)] * 2
    decoded = teacher.greedy(states, prompts, [False, False], top_k=4, limit=120)
    texts = [tokens[len(prompt) : -1] for (tokens, _), prompt in zip(decoded, prompts, strict=True)]
    forced = teacher.forced(states, prompts, texts, top_k=4, limit=120)
    for (tokens, ids), (read, read_ids) in zip(decoded, forced, strict=True):
        assert read == tokens
        np.testing.assert_array_equal(read_ids[:, 0], ids[:, 0])
    cut, cut_ids = teacher.forced(states[:1], prompts[:1], texts[:1], top_k=4, limit=5)[0]
    assert cut == prompts[0] + texts[0][:5] and cut_ids.shape == (5, 4)
    assert teacher.text("hello there", "en") == teacher.engine.text.encode(" hello there")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keeping_freed_memory_spares_a_training_steps_page_faults_then_hands_it_back():
    # In child processes: the setting lasts for a process's life.
    script = """
import contextlib, os, resource, sys
import torch
from specwhisper_training.heap import freed_memory_kept
def step():  # the head's part of a draft's training step: [positions, ids] tensors of 38 MB
    logits = torch.ones(400, 24_000)
    return (logits.log_softmax(-1) * logits.softmax(-1)).sum()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
with freed_memory_kept() if sys.argv[1] == "keep" else contextlib.nullcontext(True) as taken:
    assert taken
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    inside = resident_mb()
print(faults, inside, resident_mb())
"""
    run = [sys.executable, "-c", script]
    measured = {}
    for mode in ("keep", "default"):
        out = subprocess.run([*run, mode], capture_output=True, text=True, check=True).stdout
        measured[mode] = dict(zip(("faults", "inside", "after"), map(int, out.split()), strict=True))
    # Without the setting every page of every large tensor faults in again at every step.
    assert measured["keep"]["faults"] * 3 < measured["default"]["faults"], measured
    # The kept blocks (over 100 MB) stay resident within, and go back to the system after.
    assert measured["keep"]["inside"] > measured["default"]["inside"] + 100, measured
    assert measured["keep"]["after"] < measured["default"]["inside"] + 20, measured


def test_widening_needs_a_checkpoint_and_an_empty_folder(tmp_path, capsys):
    """Refused before anything trains or is written."""
    assert draft_cli.main(["--widen-head", str(tmp_path / "wide")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert draft_cli.main(["--checkpoint", str(tmp_path), "--widen-head", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.count("--widen-head needs --checkpoint and an empty OUT") == 2
    assert not (tmp_path / "wide").exists()
