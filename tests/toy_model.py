"""A toy export: a small random Whisper with Whisper's token layout, exported through the real graphs.

It needs no real weights, so everything from the audio to a Triton response (the engine, batching,
model.py, bad input) is tested in seconds: its transcripts are random words, but they are the
same random words however they are decoded, which is what the identity tests check.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import WhisperConfig, WhisperForConditionalGeneration

from specwhisper_backend.facts import FACTS_FILE, KV_WRITER_FILE, DecoderFacts, ModelFacts, SpecialTokens
from specwhisper_backend.features import MEL_FILTERS_FILE, SAMPLE_RATE
from specwhisper_export import cut, onnx_export, repository
from specwhisper_export.cache import cached_dir, input_key
from specwhisper_export.cut import cut_decoder_only

WORDS = 100  # text ids 0..99 are the words "w0".."w99"
LANGUAGES = ("en", "es", "fr")
TEXT_CONTEXT = 96  # the toy's n_text_ctx: every window ends within this many tokens
WIDTH, HEADS, LAYERS = 64, 4, 3
ALIGNMENT_HEADS = ((LAYERS - 2, 1), (LAYERS - 1, 0), (LAYERS - 1, 3))


def special_tokens() -> SpecialTokens:
    """Whisper's order after the text ids: end, start, languages, tasks, previous text, no speech,
    no timestamps, then 1501 timestamps."""
    eot = WORDS
    first_language = eot + 2
    after = first_language + len(LANGUAGES)
    return SpecialTokens(
        sot=eot + 1,
        eot=eot,
        translate=after,
        transcribe=after + 1,
        sot_prev=after + 2,
        no_speech=after + 3,
        no_timestamps=after + 4,
        timestamp_begin=after + 5,
    )


def vocab_size() -> int:
    return special_tokens().timestamp_begin + 1501


def _tokenizer() -> Tokenizer:
    """Words that begin with a space, as Whisper's text tokens mostly do (byte-level: "Ġ" is the space)."""
    tokenizer = Tokenizer(WordLevel({f"Ġw{i}": i for i in range(WORDS)}, unk_token="Ġw0"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _facts(assistant_layers: int | None) -> ModelFacts:
    tokens = special_tokens()

    def decoder(folder: str, layers: int, encoder: bool) -> DecoderFacts:
        return DecoderFacts(
            layers=layers,
            heads=HEADS,
            head_dim=WIDTH // HEADS,
            cross_kv_file=f"{folder}/{onnx_export.CROSS_KV_FILE}",
            decoder_file=f"{folder}/{onnx_export.DECODER_FILE}",
            encoder_file=f"{folder}/{onnx_export.ENCODER_FILE}" if encoder else None,
            alignment_file=f"{folder}/{onnx_export.ALIGNMENT_FILE}" if encoder else None,
        )

    return ModelFacts(
        n_mels=80,
        n_audio_ctx=1500,
        n_text_ctx=TEXT_CONTEXT,
        vocab_size=vocab_size(),
        is_multilingual=True,
        tokens=tokens,
        languages={code: tokens.eot + 2 + i for i, code in enumerate(LANGUAGES)},
        # As Whisper's generation config: a symbol, the tasks, previous text and no speech.
        suppress_tokens=(WORDS - 1, tokens.translate, tokens.transcribe, tokens.sot_prev, tokens.no_speech),
        begin_suppress_tokens=(tokens.eot,),
        max_initial_timestamp_index=50,
        main=decoder("main", LAYERS, encoder=True),
        assistant=None if assistant_layers is None else decoder("assistant", assistant_layers, encoder=False),
        assistant_form=None if assistant_layers is None else "decoder_only",
        alignment_heads=ALIGNMENT_HEADS,
    )


def tiny_config(**settings) -> WhisperConfig:
    """A small Whisper (64 wide, 4 heads, 128-wide feed-forward, 2 encoder and 3 decoder layers),
    with ``settings`` for the rest; the tests' random models are all of this kind."""
    defaults = {
        "d_model": WIDTH,
        "encoder_layers": 2,
        "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS,
        "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "num_mel_bins": 80,
    }
    return WhisperConfig(**(defaults | settings))


def toy_model(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    tokens = special_tokens()
    config = tiny_config(
        vocab_size=vocab_size(),
        max_source_positions=1500,
        max_target_positions=TEXT_CONTEXT,
        decoder_start_token_id=tokens.sot,
        pad_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        bos_token_id=tokens.eot,
        init_std=0.3,  # weights large enough that what a row says depends on its audio and text
        tie_word_embeddings=False,
    )
    model = WhisperForConditionalGeneration(config).eval()
    eot, timestamps = special_tokens().eot, special_tokens().timestamp_begin
    with torch.no_grad():
        # Mostly words, some timestamps, and an end of text that comes after a few to a hundred tokens:
        # the end's score follows a direction the final norm adds to every state.
        model.proj_out.weight[timestamps:] *= 0.3
        direction = torch.randn(WIDTH)
        direction /= direction.norm()
        model.model.decoder.layer_norm.bias.copy_(direction)
        model.proj_out.weight[eot] = 2.4 * direction
    return model


def noisy_copy(model: WhisperForConditionalGeneration, scale: float, seed: int = 1) -> WhisperForConditionalGeneration:
    """The model with noise on its decoder layers: a draft that agrees with it most of the time."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in noisy.model.decoder.layers.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * scale * weight.std())
    return noisy


def write_toy_export(out: Path, draft_noise: float | None = 0.03, seed: int = 0) -> Path:
    """Export the toy model into ``out``, laid out as ``specwhisper-export`` lays out a real one, with
    a decoder-only draft: the model itself with ``draft_noise`` on its layers (0: a draft that always
    agrees; None: no draft)."""
    model = toy_model(seed)
    (out / "main").mkdir(parents=True)
    onnx_export.export_encoder(model, out / "main" / onnx_export.ENCODER_FILE)
    onnx_export.export_cross_kv(model, WIDTH, out / "main" / onnx_export.CROSS_KV_FILE)
    onnx_export.export_decoder(model, out / "main" / onnx_export.DECODER_FILE)
    onnx_export.export_kv_writer(out / KV_WRITER_FILE, "float32")
    onnx_export.export_alignment(model, ALIGNMENT_HEADS, out / "main" / onnx_export.ALIGNMENT_FILE)
    repository._copy_vad(out)
    if draft_noise is not None:
        draft = cut_decoder_only(noisy_copy(model, draft_noise), tuple(range(LAYERS)))
        (out / "assistant").mkdir()
        onnx_export.export_cross_kv(draft, WIDTH, out / "assistant" / onnx_export.CROSS_KV_FILE)
        onnx_export.export_decoder(draft, out / "assistant" / onnx_export.DECODER_FILE)
    (out / "processor").mkdir()
    _tokenizer().save(str(out / "processor" / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    np.save(out / MEL_FILTERS_FILE, rng.uniform(0, 0.02, size=(201, 80)).astype(np.float32))
    facts = _facts(None if draft_noise is None else LAYERS)
    (out / FACTS_FILE).write_text(facts.to_json())
    return out


def cached_export(build: Callable[[Path], object], *key: object) -> Path:
    """The folder ``build(folder)`` exports into, kept in the artefact cache between test sessions:
    ONNX export takes most of a run of the fast tests. Keyed by the code that writes the graphs,
    this file (the toy models), the draft cut the toy's draft is made with, the file that defines
    ``build`` (a test module's own model settings and graph list), torch's version and ``key``."""
    modules = (__file__, cut.__file__, inspect.getsourcefile(build))
    sources = [hashlib.sha256(Path(module).read_bytes()).hexdigest() for module in modules]
    return cached_dir("test-exports", input_key(repository.code_version(), *sources, torch.__version__, *key), build)


def toy_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise-like 16 kHz audio (the toy model hears anything as random words)."""
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
