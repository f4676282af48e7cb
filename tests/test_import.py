"""The CT2 -> transformers import and the presets: format parsing, tokenizer repair, fidelity.

Fast tests use synthetic inputs. Slow ones build the real presets (cached after the first run),
compare the converted models with ctranslate2 itself and transcribe real English speech.
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from specwhisper_backend.features import SAMPLE_RATE
from specwhisper_export.ct2_import import (
    add_timestamp_tokens,
    read_model_bin,
    restore_first_merge,
)
from specwhisper_export.presets import ct2_dir, load_whisper, resolve_checkpoint

SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")

# --------------------------------------------------------------------------------------------
# Synthetic model.bin: written the way ctranslate2's ModelSpec._serialize does.

_DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def _model_bin(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> bytes:
    out = [struct.pack("<I", 6), _string("WhisperSpec"), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        out += [_string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", dim) for dim in value.shape]
        out += [struct.pack("<B", _DTYPE_IDS[value.dtype.name]), struct.pack("<I", value.nbytes)]
        out.append(value.tobytes())
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(a) + _string(b) for a, b in aliases.items()]
    return b"".join(out)


def test_read_model_bin_round_trip(tmp_path: Path) -> None:
    variables = {
        "decoder/embeddings/weight": np.arange(12, dtype=np.float16).reshape(3, 4),
        "decoder/num_heads": np.array(8, dtype=np.int16),
        "decoder/pre_norm": np.array(1, dtype=np.int8),
        "encoder/conv1/bias": np.linspace(-1, 1, 5, dtype=np.float32),
    }
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"}))
    parsed = read_model_bin(path)
    assert (parsed.spec_name, parsed.revision) == ("WhisperSpec", 3)
    assert parsed.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert parsed.variables.keys() == variables.keys()
    for name, value in variables.items():
        assert parsed.variables[name].dtype == value.dtype
        np.testing.assert_array_equal(parsed.variables[name], value)


def test_read_model_bin_rejects_a_missing_part(tmp_path: Path) -> None:
    blob = _model_bin({"w": np.zeros((64, 64), np.float16)}, {})
    path = tmp_path / "model.bin"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_model_bin(path)


@pytest.mark.parametrize("as_lists", [False, True])
def test_restore_first_merge(as_lists: bool) -> None:
    merges = [["Ġ", "a"], ["Ġt", "h"]] if as_lists else ["Ġ a", "Ġt h"]
    tokenizer_json = {"model": {"vocab": {"Ġt": 1}, "merges": merges}}
    assert restore_first_merge(tokenizer_json)
    assert tokenizer_json["model"]["merges"][0] == (["Ġ", "t"] if as_lists else "Ġ t")
    assert not restore_first_merge(tokenizer_json)  # idempotent
    assert len(tokenizer_json["model"]["merges"]) == 3


def test_add_timestamp_tokens() -> None:
    tokenizer_json = {"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 2, "content": "<|x|>"}]}
    assert add_timestamp_tokens(tokenizer_json, n_vocab=3 + 1501, n_audio_ctx=1500) == 1501
    stamps = tokenizer_json["added_tokens"][1:]
    assert (stamps[0]["id"], stamps[0]["content"]) == (3, "<|0.00|>")
    assert (stamps[-1]["id"], stamps[-1]["content"]) == (1503, "<|30.00|>")
    assert add_timestamp_tokens(tokenizer_json, n_vocab=1504, n_audio_ctx=1500) == 0
    with pytest.raises(ValueError, match="timestamp"):
        add_timestamp_tokens(tokenizer_json, n_vocab=1600, n_audio_ctx=1500)


def test_resolve_checkpoint_passthrough(tmp_path: Path) -> None:
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)
    assert resolve_checkpoint("distil-whisper/distil-large-v2") == "distil-whisper/distil-large-v2"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# Real weights


@functools.cache
def _loaded(name: str):
    return load_whisper(name)


@functools.cache
def _english_prompts(count: int = 20, min_seconds: float = 2.0) -> list[tuple[str, str, np.ndarray]]:
    """(name, transcript, 16 kHz audio) of the first Asterisk prompts longer than ``min_seconds``.

    Transcript lines are ``name: text``; ``;`` starts a comment and ``[...]`` marks a stage
    direction (tones, silence) rather than speech.
    """
    soundfile = pytest.importorskip("soundfile")
    soxr = pytest.importorskip("soxr")
    if not TRANSCRIPTS.is_file():
        pytest.skip("Debian package asterisk-core-sounds-en-wav is not installed")
    prompts = []
    with gzip.open(TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            name, sep, text = line.partition(":")
            wav = SOUNDS_DIR / f"{name.strip()}.wav"
            text = text.strip()
            if line.startswith(";") or not sep or not text or "[" in text or not wav.is_file():
                continue
            if soundfile.info(wav).duration <= min_seconds:
                continue
            audio, rate = soundfile.read(wav, dtype="float32")
            prompts.append((name.strip(), text, soxr.resample(audio, rate, SAMPLE_RATE)))
            if len(prompts) == count:
                break
    return prompts


def _features(processor, audios: list[np.ndarray]):
    return processor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def _prompt_kwargs(model) -> dict[str, str]:
    """English-only models refuse `language`/`task`, exactly like openai/whisper-*.en."""
    return {"language": "en", "task": "transcribe"} if model.generation_config.is_multilingual else {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "d_model", "layers", "heads", "n_vocab"),
    [("base", 512, 6, 8, 51865), ("tiny.en", 384, 4, 6, 51864)],
)
def test_preset_converts(name: str, d_model: int, layers: int, heads: int, n_vocab: int) -> None:
    model, processor = _loaded(name)
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (d_model, layers, layers)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (heads, heads)
    assert (config.encoder_ffn_dim, config.vocab_size, config.num_mel_bins) == (4 * d_model, n_vocab, 80)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert processor.feature_extractor.feature_size == 80
    assert len(processor.tokenizer) == n_vocab
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert all(p.dtype.is_floating_point and p.isfinite().all() for p in model.parameters())
    assert not model.training


@pytest.mark.slow
def test_base_tokenizer_and_generation_config() -> None:
    model, processor = _loaded("base")
    tokenizer, generation = processor.tokenizer, model.generation_config
    assert tokenizer.encode(" the", add_special_tokens=False) == [264]  # needs the restored merge
    phrase = " Please enter your password, followed by the pound key."
    assert tokenizer.decode(tokenizer.encode(phrase, add_special_tokens=False)) == phrase
    ids = tokenizer.convert_tokens_to_ids
    assert ids(["<|endoftext|>", "<|startoftranscript|>", "<|en|>"]) == [50257, 50258, 50259]
    assert ids(["<|translate|>", "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>"]) == [
        50358,
        50359,
        50361,
        50363,
    ]
    assert tokenizer.all_special_ids[-1] + 1 == ids("<|0.00|>") == 50364
    assert generation.is_multilingual
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id) == (
        50258,
        50257,
        50257,
    )
    assert (generation.no_timestamps_token_id, generation.prev_sot_token_id) == (50363, 50361)
    assert len(generation.lang_to_id) == 99 and generation.lang_to_id["<|en|>"] == 50259
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert generation.begin_suppress_tokens == [220, 50257]
    assert generation.alignment_heads[0] == [3, 1] and generation.max_length == 448
    assert generation.forced_decoder_ids is None


@pytest.mark.slow
def test_tiny_en_tokenizer_and_generation_config() -> None:
    model, processor = _loaded("tiny.en")
    tokenizer, generation = processor.tokenizer, model.generation_config
    assert tokenizer.encode(" the", add_special_tokens=False) == [tokenizer.get_vocab()["Ġthe"]]
    assert not generation.is_multilingual
    assert not hasattr(generation, "lang_to_id")  # else generate() would detect a language
    assert (generation.decoder_start_token_id, generation.eos_token_id) == (50257, 50256)
    assert generation.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>") == 50362


@pytest.mark.slow
def test_base_detects_english() -> None:
    model, processor = _loaded("base")
    features = _features(processor, [audio for _, _, audio in _english_prompts()[:2]])
    languages = model.detect_language(features)
    assert languages.tolist() == [model.generation_config.lang_to_id["<|en|>"]] * 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_logits_match_ctranslate2(name: str) -> None:
    """Teacher-force CT2's own greedy output through the converted model; compare every step."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    model, processor = _loaded(name)
    _, _, audio = _english_prompts()[0]
    features = _features(processor, [audio]).numpy()
    generation = model.generation_config
    prompt = [generation.decoder_start_token_id]
    if generation.is_multilingual:
        prompt += [generation.lang_to_id["<|en|>"], generation.task_to_id["transcribe"]]
    prompt.append(generation.no_timestamps_token_id)

    reference = ctranslate2.models.Whisper(str(ct2_dir(name)), device="cpu", compute_type="float32")
    result = reference.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
        [prompt],
        beam_size=1,
        return_logits_vocab=True,
        suppress_blank=False,
        suppress_tokens=[],
        max_length=64,
    )[0]
    tokens = result.sequences_ids[0]
    ct2_logits = np.stack([np.asarray(step).reshape(-1) for step in result.logits[0]])
    with torch.no_grad():
        logits = model(
            input_features=torch.from_numpy(features), decoder_input_ids=torch.tensor([prompt + tokens])
        ).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ct2_logits)]
    assert len(tokens) > 5 and np.abs(ct2_logits).max() > 20  # a real transcript, not degenerate
    np.testing.assert_allclose(logits.numpy(), ct2_logits, rtol=0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_greedy_transcription_wer(name: str) -> None:
    jiwer = pytest.importorskip("jiwer")
    import torch
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    model, processor = _loaded(name)
    prompts = _english_prompts()
    assert len(prompts) == 20
    with torch.no_grad():
        features = _features(processor, [audio for _, _, audio in prompts])
        ids = model.generate(features, **_prompt_kwargs(model))
    normalize = EnglishTextNormalizer({})
    hypotheses = [normalize(text) for text in processor.batch_decode(ids, skip_special_tokens=True)]
    references = [normalize(text) for _, text, _ in prompts]
    # Clean studio prompts: the errors are mostly the reference's own typos (docs/experiments.md).
    assert jiwer.wer(references, hypotheses) < 0.06
