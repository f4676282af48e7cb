"""Export a main model and its assistant into a Triton model repository.

The graphs, tokenizer files and model facts are built once per set of inputs in the user cache
(:mod:`specwhisper_export.cache`) and linked into the repository, so re-running the export with the
same inputs takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoConfig,
    WhisperForCausalLM,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from specwhisper_backend import facts as backend_facts
from specwhisper_backend.facts import FACTS_FILE, DecoderFacts, DraftRoute, ModelFacts
from specwhisper_backend.features import MEL_FILTERS_FILE
from specwhisper_backend.vad import VAD_FILE
from specwhisper_export import compat, graphs, model_facts, onnx_export
from specwhisper_export.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_export.presets import resolve_checkpoint
from specwhisper_export.triton_config import ServingOptions, render_config

AssistantForm = Literal["auto", "decoder_only", "full"]
Precision = Literal["fp32", "fp16"]
PROCESSOR_DIR = "processor"
# Beside a trained draft's checkpoint: {"token_ids": [...]}, the vocabulary subset its head covers.
DRAFT_VOCAB_FILE = "draft_vocab.json"
# In a draft's checkpoint: its acceptance by language on held-out recordings (a shipped draft's record).
ACCEPTANCE_FILE = "draft_acceptance.json"
# The modules that shape the artefacts: a change to any of them (or to the build functions below)
# invalidates cached exports; changes elsewhere, e.g. to how a repository is laid out, do not.
_EXPORT_SOURCES = (graphs, onnx_export, model_facts, backend_facts)


@dataclass(frozen=True)
class ExportRequest:
    main: str  # preset name, checkpoint directory or Hugging Face id
    assistant: str | None = None
    assistant_form: AssistantForm = "auto"
    precision: Precision = "fp32"
    # int8 weights for the assistant's decoder only: a cheaper draft step; what it proposes is still
    # verified by the main model, so this can change acceptance, never the output.
    assistant_int8: bool = False
    # Drafts for some languages, ((languages, draft), ...): rows decoding in one of those languages
    # draft with that draft instead of ``assistant`` (ModelFacts.routes). Each is exported as the
    # assistant is (int8 alike) and must read the main encoder's output, as a decoder-only draft does.
    routes: tuple[tuple[tuple[str, ...], str], ...] = ()

    def __post_init__(self) -> None:
        if self.assistant_form not in ("auto", "decoder_only", "full"):
            raise ValueError(f"assistant_form must be auto, decoder_only or full, not {self.assistant_form!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, not {self.precision!r}")
        if self.assistant_int8 and (self.assistant is None or self.precision != "fp32"):
            raise ValueError("an int8 assistant needs an assistant and an fp32 export")
        if self.routes and self.assistant is None:
            raise ValueError("drafts routed by language need an assistant, the draft of the other languages")
        if any(not languages for languages, _ in self.routes):
            raise ValueError("a routed draft needs at least one language")


def code_version() -> str:
    """A digest of the code that writes the graphs: a change to it re-exports every cached export."""
    digest = hashlib.sha256()
    for module in _EXPORT_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    for function in (_build, _decoder_facts, draft_vocabulary, measured_acceptance, _load, _copy_vad):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()[:12]


def resolve_form(main_config, assistant_checkpoint: str, requested: AssistantForm) -> str:
    """Decoder-only when the assistant can read the main encoder's output, unless asked otherwise.

    A checkpoint saved as ``WhisperForCausalLM`` has no encoder; a distil-whisper checkpoint has the
    main model's encoder copied, so reusing the main encoder's output saves a second encoder pass.
    """
    config = AutoConfig.from_pretrained(assistant_checkpoint)
    reads_main_encoder = config.d_model == main_config.d_model
    if requested == "decoder_only" and not reads_main_encoder:
        raise ValueError(
            f"a decoder-only assistant must have the main model's width: d_model {config.d_model} != "
            f"{main_config.d_model}; export it as a full model (--assistant-form full)"
        )
    if requested != "auto":
        return requested
    if "WhisperForCausalLM" in (config.architectures or []):
        return "decoder_only"
    same_encoder = reads_main_encoder and config.encoder_layers == main_config.encoder_layers
    return "decoder_only" if same_encoder else "full"


def draft_vocabulary(checkpoint: str) -> list[int] | None:
    path = Path(checkpoint) / DRAFT_VOCAB_FILE
    return json.loads(path.read_text())["token_ids"] if path.is_file() else None


def measured_acceptance(checkpoint: str) -> dict[str, float]:
    """The draft's held-out acceptance by language, where its checkpoint says (none: a generic start)."""
    path = Path(checkpoint) / ACCEPTANCE_FILE
    if not path.is_file():
        return {}
    return {language: float(value) for language, value in json.loads(path.read_text()).items()}


def write_measured_acceptance(checkpoint: Path, acceptance: Mapping[str, float]) -> None:
    """Keep a draft's held-out acceptance by language in its checkpoint, so that every export of it
    carries the figures and a fresh instance starts from them rather than from a generic guess."""
    figures = {language: float(value) for language, value in acceptance.items()}
    (Path(checkpoint) / ACCEPTANCE_FILE).write_text(json.dumps(figures))


def _load(checkpoint: str, form: str = "full") -> tuple[torch.nn.Module, WhisperProcessor]:
    """A checkpoint in fp32 with its processor: encoder-decoder, or decoder-only (``WhisperForCausalLM``)."""
    cls = WhisperForCausalLM if form == "decoder_only" else WhisperForConditionalGeneration
    model = cls.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(checkpoint)


def _build(request: ExportRequest, main_ckpt: str, assistant_ckpt: str | None, form: str | None, out: Path) -> None:
    main, processor = _load(main_ckpt)
    dtype = torch.float16 if request.precision == "fp16" else torch.float32
    np_dtype = "float16" if request.precision == "fp16" else "float32"
    steps: list[tuple[str, Callable[[], None]]] = []

    main = main.to(dtype)
    alignment = getattr(main.generation_config, "alignment_heads", None) or ()
    heads = tuple(tuple(int(x) for x in pair) for pair in alignment)
    if assistant_ckpt is None:
        (out / "main").mkdir()
        steps += [
            ("main encoder", lambda: onnx_export.export_encoder(main, out / "main" / onnx_export.ENCODER_FILE)),
            (
                "main cross K/V",
                lambda: onnx_export.export_cross_kv(
                    main, main.config.d_model, out / "main" / onnx_export.CROSS_KV_FILE
                ),
            ),
            ("main decoder", lambda: onnx_export.export_decoder(main, out / "main" / onnx_export.DECODER_FILE)),
            ("KV cache writer", lambda: onnx_export.export_kv_writer(out / backend_facts.KV_WRITER_FILE, np_dtype)),
        ]
        if heads:
            path = out / "main" / onnx_export.ALIGNMENT_FILE
            steps.append(("main alignment", lambda: onnx_export.export_alignment(main, heads, path)))
    main_facts = _decoder_facts(main, "main", with_encoder=True, dtype=np_dtype)
    if heads:
        main_facts = replace(main_facts, alignment_file=f"main/{onnx_export.ALIGNMENT_FILE}")

    assistant_facts = None
    if assistant_ckpt is not None:
        assistant, assistant_processor = _load(assistant_ckpt, form)
        compat.check_assistant(
            processor.tokenizer,
            main.config.vocab_size,
            assistant_processor.tokenizer,
            assistant.config.vocab_size,
            request.assistant,
        )
        # The main model's graphs do not depend on the assistant: those of its own export are linked.
        # Trying several drafts for one main model (or a draft's report) then exports the draft alone.
        alone = export_artefacts(ExportRequest(main=request.main, precision=request.precision))
        link_tree(alone / "main", out / "main")
        link_tree(alone, out, [backend_facts.KV_WRITER_FILE])
        assistant = assistant.to(dtype)
        (out / "assistant").mkdir()
        full = form == "full"
        encoder_dim = assistant.config.d_model if full else main.config.d_model
        if full:
            steps.append(
                (
                    "assistant encoder",
                    lambda: onnx_export.export_encoder(assistant, out / "assistant" / onnx_export.ENCODER_FILE),
                )
            )
        steps += [
            (
                "assistant cross K/V",
                lambda: onnx_export.export_cross_kv(
                    assistant, encoder_dim, out / "assistant" / onnx_export.CROSS_KV_FILE
                ),
            ),
            (
                "assistant decoder",
                lambda: onnx_export.export_decoder(
                    assistant, out / "assistant" / onnx_export.DECODER_FILE, draft_vocabulary(assistant_ckpt)
                ),
            ),
        ]
        assistant_facts = _decoder_facts(
            assistant,
            "assistant",
            with_encoder=full,
            dtype=np_dtype,
            trimmed=draft_vocabulary(assistant_ckpt) is not None,
        )
        assistant_facts = replace(assistant_facts, acceptance=measured_acceptance(assistant_ckpt))

    for name, step in (bar := tqdm(steps, desc="ONNX export", unit="graph")):
        bar.set_postfix_str(name)
        step()

    _copy_vad(out)
    processor.save_pretrained(out / PROCESSOR_DIR)
    # The backend computes features without transformers, with the extractor's own filter bank.
    np.save(out / MEL_FILTERS_FILE, np.asarray(processor.feature_extractor.mel_filters, dtype=np.float32))
    facts = model_facts.build_facts(main, processor.tokenizer, main_facts, assistant_facts, form)
    (out / FACTS_FILE).write_text(facts.to_json())


def _copy_vad(out: Path) -> None:
    """Silero VAD's ONNX file from the ``silero-vad`` package (found, not imported: it imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is missing: pip install silero-vad")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    target = out / VAD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _decoder_facts(
    model: torch.nn.Module, folder: str, with_encoder: bool, dtype: str, trimmed: bool = False
) -> DecoderFacts:
    shape = onnx_export.decoder_shape(model)
    return DecoderFacts(
        layers=shape.layers,
        heads=shape.heads,
        head_dim=shape.head_dim,
        cross_kv_file=f"{folder}/{onnx_export.CROSS_KV_FILE}",
        decoder_file=f"{folder}/{onnx_export.DECODER_FILE}",
        encoder_file=f"{folder}/{onnx_export.ENCODER_FILE}" if with_encoder else None,
        dtype=dtype,
        logit_ids_file=f"{folder}/{onnx_export.LOGIT_IDS_FILE}" if trimmed else None,
    )


def export_artefacts(request: ExportRequest) -> Path:
    """The cached directory of graphs, processor files and model facts for this request."""
    main_ckpt = resolve_checkpoint(request.main)
    assistant_ckpt = resolve_checkpoint(request.assistant) if request.assistant else None
    form = None
    if assistant_ckpt is not None:
        form = resolve_form(AutoConfig.from_pretrained(main_ckpt), assistant_ckpt, request.assistant_form)
    key = input_key(
        code_version(),
        checkpoint_identity(main_ckpt),
        checkpoint_identity(assistant_ckpt) if assistant_ckpt else None,
        form,
        request.precision,
    )
    artefacts = cached_dir("onnx", key, lambda tmp: _build(request, main_ckpt, assistant_ckpt, form, tmp))
    artefacts = _int8_assistant(artefacts) if request.assistant_int8 else artefacts
    if not request.routes:
        return artefacts
    routed = [
        (languages, export_artefacts(replace(request, assistant=draft, routes=())))
        for languages, draft in request.routes
    ]
    named = (f"{','.join(languages)}={source.name}" for languages, source in routed)
    key = input_key("routes", artefacts.name, *named, inspect.getsource(_add_routes))
    return cached_dir("onnx", key, lambda tmp: _add_routes(artefacts, routed, tmp))


def _add_routes(artefacts: Path, routed: Sequence[tuple[tuple[str, ...], Path]], out: Path) -> None:
    """``artefacts`` with each routed draft's decoder (from the export of the main model with that
    draft, ``routed``) in ``route<n>/`` beside the assistant, and named in the facts' routes."""
    link_tree(artefacts, out)
    routes = []
    for index, (languages, source) in enumerate(routed):
        draft = ModelFacts.load(source)
        if draft.assistant_form != "decoder_only":
            raise ValueError(f"the draft routed to {', '.join(languages)} must read the main encoder's output")
        decoder, folder = draft.assistant, f"route{index}"
        link_tree(source / Path(decoder.decoder_file).parent, out / folder)
        files = ("cross_kv_file", "decoder_file", "logit_ids_file")
        moved = {name: f"{folder}/{Path(getattr(decoder, name)).name}" for name in files if getattr(decoder, name)}
        routes.append(DraftRoute(tuple(languages), replace(decoder, **moved)))
    write_linked_facts(out, replace(ModelFacts.load(artefacts), routes=tuple(routes)))  # checks the languages


def _int8_assistant(artefacts: Path) -> Path:
    """``artefacts`` with the assistant decoder's weights in int8 (ONNX Runtime dynamic
    quantisation), cached beside it; every other file is linked, not copied."""
    key = input_key("int8-assistant", artefacts.name, inspect.getsource(_quantize_assistant))
    return cached_dir("onnx", key, lambda tmp: _quantize_assistant(artefacts, tmp))


def _quantize_assistant(artefacts: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    decoder = backend_facts.ModelFacts.load(artefacts).assistant.decoder_file
    link_tree(artefacts, out)
    # The quantiser refuses hard-linked external data (the cache links it into repositories), and
    # writes helper files beside its input: it reads a private copy.
    work = out / "quantize-input"
    work.mkdir()
    for path in (artefacts / decoder).parent.glob(Path(decoder).name + "*"):
        shutil.copy2(path, work / path.name)
        (out / decoder).parent.joinpath(path.name).unlink()
    quantize_dynamic(work / Path(decoder).name, out / decoder, weight_type=QuantType.QInt8)
    shutil.rmtree(work)


def write_linked_facts(directory: Path, facts: ModelFacts) -> None:
    """Write ``facts`` into a tree made by :func:`link_tree`: its facts file is a hard link into the
    export it came from, so it is replaced, never written through (which would change that export)."""
    (directory / FACTS_FILE).unlink(missing_ok=True)
    (directory / FACTS_FILE).write_text(facts.to_json())


def link_tree(source: Path, target: Path, names: Sequence[str] = ()) -> None:
    """Hard-link (or copy, across file systems) ``source`` into ``target``, or only the files
    ``names`` directly in it: ONNX files are large."""
    for path in (source / name for name in names) if names else source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


# The Triton model's code: a thin model.py over specwhisper_backend, kept in the repository's
# model_repository/ folder (where Triton users look for it) and copied beside the exported graphs.
MODEL_PY = Path(__file__).resolve().parents[2] / "model_repository" / "specwhisper" / "1" / "model.py"
STREAM_SUFFIX = "_stream"


def write_repository(
    request: ExportRequest, out: Path, model_name: str = "specwhisper", serving: ServingOptions | None = None
) -> list[Path]:
    """Write ``out/<model_name>/{config.pbtxt, 1/...}`` (and its streaming twin); return the model dirs."""
    if not MODEL_PY.is_file():
        raise FileNotFoundError(f"{MODEL_PY} is missing: export from a checkout of the project")
    serving = serving or ServingOptions()
    artefacts = export_artefacts(request)
    names = [(model_name, False)] + ([(model_name + STREAM_SUFFIX, True)] if serving.streaming else [])
    written = []
    for name, decoupled in names:
        model_dir = Path(out) / name
        version = model_dir / "1"
        if version.is_dir():
            for entry in version.iterdir():  # keep a model.py that is this very source file
                if entry.resolve() != MODEL_PY:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        link_tree(artefacts, version)
        if (version / "model.py").resolve() != MODEL_PY:
            shutil.copy2(MODEL_PY, version / "model.py")
        (model_dir / "config.pbtxt").write_text(render_config(name, serving, decoupled=decoupled))
        written.append(model_dir)
    return written
