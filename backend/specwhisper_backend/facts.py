"""The model facts the export step writes beside the ONNX graphs (``model_facts.json``).

Token ids, languages and graph shapes are read from here, never written as literals, so one engine
serves every Whisper size, multilingual or English-only, and any assistant that was exported with it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

FACTS_FILE = "model_facts.json"
# 3: a decoder's logits may cover a vocabulary subset (logit_ids_file). 4: the alignment graph.
# 5: drafts routed by language (routes).
FACTS_FORMAT = 5
# Writes a decoder step's new K/V into caches that stay on the device (see decoder_session).
KV_WRITER_FILE = "kv_writer.onnx"


def cache_names(layers: int, prefix: str) -> list[str]:
    """``<prefix>_key_0, <prefix>_value_0, <prefix>_key_1, ...``: how the decoder graphs name their
    per-layer cache inputs (``past``, ``cross``) and outputs (``new``), in order."""
    return [f"{prefix}_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class SpecialTokens:
    sot: int
    eot: int
    transcribe: int
    translate: int
    no_timestamps: int
    timestamp_begin: int
    sot_prev: int
    no_speech: int | None


@dataclass(frozen=True)
class DecoderFacts:
    """Where a decoder's graphs are (relative to the facts file) and how big its caches are."""

    layers: int
    heads: int
    head_dim: int
    cross_kv_file: str
    decoder_file: str
    encoder_file: str | None = None  # only a full-model assistant has an encoder of its own
    dtype: Literal["float32", "float16"] = "float32"
    # A trained draft's head scores a vocabulary subset: its logits have one column per id in this
    # file (int64 .npy, relative to the facts file). None: the whole vocabulary.
    logit_ids_file: str | None = None
    # The main model's alignment graph (word timestamps), where it has alignment heads.
    alignment_file: str | None = None
    # A draft's acceptance by language, measured on held-out recordings when it shipped: where a new
    # instance's acceptance estimates start for those languages (SeenAcceptance), not a generic guess.
    acceptance: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DraftRoute:
    """A draft for some languages: rows decoding in one of ``languages`` draft with it instead of the
    default assistant. A draft trained for a few languages is better at them than one for many, and
    routing keeps the default draft's speed in its own languages (docs/draft-training.md)."""

    languages: tuple[str, ...]
    decoder: DecoderFacts


@dataclass(frozen=True)
class ModelFacts:
    n_mels: int
    n_audio_ctx: int
    n_text_ctx: int
    vocab_size: int
    is_multilingual: bool
    tokens: SpecialTokens
    languages: dict[str, int]
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    max_initial_timestamp_index: int
    main: DecoderFacts
    assistant: DecoderFacts | None
    assistant_form: Literal["decoder_only", "full"] | None
    alignment_heads: tuple[tuple[int, int], ...] = field(default=())
    routes: tuple[DraftRoute, ...] = field(default=())  # decoder-only drafts, as the assistant reads

    def __post_init__(self) -> None:
        routed = [language for route in self.routes for language in route.languages]
        if len(routed) != len(set(routed)):
            raise ValueError(f"a language is routed to two drafts: {sorted(routed)}")
        if self.routes and (self.assistant is None or self.assistant_form != "decoder_only"):
            raise ValueError("routed drafts need a decoder-only default assistant: they read the main encoder")
        unknown = sorted(set(routed) - set(self.languages))
        if unknown:
            raise ValueError(f"routed languages the main model does not know: {unknown}")

    def route(self, language: str) -> int | None:
        """The index of the route that drafts ``language``; None: the default assistant."""
        for index, route in enumerate(self.routes):
            if language in route.languages:
                return index
        return None

    def draft(self, language: str) -> DecoderFacts | None:
        """The draft that drafts ``language``: its route's, or the default assistant (None: no draft)."""
        route = self.route(language)
        return self.assistant if route is None else self.routes[route].decoder

    def to_json(self) -> str:
        return json.dumps({"format": FACTS_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelFacts:
        raw = json.loads(text)
        if raw.pop("format", None) != FACTS_FORMAT:
            raise ValueError(f"{FACTS_FILE} is not of format {FACTS_FORMAT}: re-run the export")
        assistant = raw.pop("assistant")
        routes = raw.pop("routes", [])
        return cls(
            **{
                **raw,
                "tokens": SpecialTokens(**raw["tokens"]),
                "main": DecoderFacts(**raw["main"]),
                "assistant": DecoderFacts(**assistant) if assistant else None,
                "suppress_tokens": tuple(raw["suppress_tokens"]),
                "begin_suppress_tokens": tuple(raw["begin_suppress_tokens"]),
                "alignment_heads": tuple(tuple(pair) for pair in raw["alignment_heads"]),
                "routes": tuple(
                    DraftRoute(tuple(route["languages"]), DecoderFacts(**route["decoder"])) for route in routes
                ),
            }
        )

    @classmethod
    def load(cls, directory: Path) -> ModelFacts:
        return cls.from_json((Path(directory) / FACTS_FILE).read_text())
