"""Drafts that ship with the project, so that a main model is speculative without training first.

A trained draft (``specwhisper-train-draft``) keeps the main model's token embeddings and output
projection frozen: what training changed is its few decoder layers, their norms and its position
embeddings. Only those are shipped, in fp16 (``drafts/<main>.safetensors``), with the ids its head
scores and a record of how it was trained and what it achieved held out (``drafts/<main>.json``).
On first use the full checkpoint is rebuilt from them and the main model's own weights, checked,
and cached; it is then a checkpoint like any other for ``specwhisper-export --assistant``.

A main model may also ship named drafts for some languages (``drafts/<main>-routed/<name>.*``, their
record's ``route``): the export routes the rows in those languages to them, beside the default
draft (``ModelFacts.routes``), so a draft trained for other languages adds speed there without
taking any from the languages the default draft serves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperForCausalLM

from specwhisper_export.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_export.cut import cut_decoder_only
from specwhisper_export.presets import load_whisper, resolve_checkpoint
from specwhisper_export.repository import DRAFT_VOCAB_FILE, write_measured_acceptance

DRAFTS_DIR = Path(__file__).parent / "drafts"
# Tensors a draft shares with its main model, frozen in training: never shipped, taken from the main.
SHARED = ("model.decoder.embed_tokens.weight", "proj_out.weight")
TOKEN_IDS = "token_ids"  # the ids the head scores, stored beside the weights (int32)
# 2: the rebuilt checkpoint carries the record's held-out acceptance (ACCEPTANCE_FILE).
UNPACK_FORMAT = 2


def shipped_files(main: str, name: str | None = None) -> tuple[Path, Path]:
    """The weights and the record of ``main``'s shipped draft, the default or the one called ``name``
    (which may not exist)."""
    stem = DRAFTS_DIR / main if name is None else _routed_dir(main) / name
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


def _routed_dir(main: str) -> Path:
    return DRAFTS_DIR / f"{main}-routed"


def has_shipped_draft(main: str, name: str | None = None) -> bool:
    return all(path.is_file() for path in shipped_files(main, name))


def shipped_record(main: str, name: str | None = None) -> dict:
    """How the shipped draft was trained and what it measured held out (see specwhisper_training.pack)."""
    return json.loads(shipped_files(main, name)[1].read_text())


def routed_names(main: str) -> list[str]:
    """The names of ``main``'s shipped drafts for some languages, sorted."""
    return sorted(path.stem for path in _routed_dir(main).glob("*.json"))


def pack_draft(checkpoint: Path, main: str, record: dict, name: str | None = None) -> tuple[Path, Path]:
    """Write ``main``'s shipped draft (the default, or the one called ``name``) from a trained draft
    checkpoint; returns the two files. A named draft's ``record`` says its ``route``.

    Refuses a draft whose embeddings or output projection differ from the main model's, since those
    are not shipped and would be rebuilt from the main model.
    """
    if name is not None and not record.get("route"):
        raise ValueError(f"a named draft ({name!r}) is routed to some languages: its record needs a 'route'")
    draft = WhisperForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    main_model, _ = load_whisper(main)
    state = draft.state_dict()
    embeddings = main_model.model.decoder.embed_tokens.weight
    for tensor in SHARED:
        if not torch.equal(state[tensor], embeddings):
            raise ValueError(f"{checkpoint}: {tensor} is not the main model's; this draft cannot ship as a delta")
    token_ids = json.loads((Path(checkpoint) / DRAFT_VOCAB_FILE).read_text())["token_ids"]
    tensors = {name: value.to(torch.float16).contiguous() for name, value in state.items() if name not in SHARED}
    tensors[TOKEN_IDS] = torch.as_tensor(token_ids, dtype=torch.int32)
    weights, record_file = shipped_files(main, name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights))
    layers = draft.config.decoder_layers
    record_file.write_text(json.dumps({"main": main, "decoder_layers": layers, **record}, indent=1) + "\n")
    return weights, record_file


def shipped_draft(main: str, name: str | None = None) -> Path:
    """``main``'s shipped draft (the default, or the one called ``name``) as a checkpoint directory,
    rebuilt once and cached."""
    if not has_shipped_draft(main, name):
        what = "no draft" if name is None else f"no draft called {name!r}"
        raise FileNotFoundError(f"{what} ships for {main!r} in {DRAFTS_DIR}: train one (specwhisper-train-draft)")
    weights, _ = shipped_files(main, name)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    key = input_key("shipped-draft", checkpoint_identity(resolve_checkpoint(main)), digest, UNPACK_FORMAT)
    return cached_dir("drafts", key, lambda tmp: _unpack(main, name, tmp))


def _unpack(main: str, name: str | None, out: Path) -> None:
    weights, _ = shipped_files(main, name)
    record = shipped_record(main, name)
    tensors = load_file(str(weights))
    token_ids = tensors.pop(TOKEN_IDS).to(torch.int64)
    main_model, processor = load_whisper(main)
    # The layers are placeholders here (their weights all come from the shipped file): the cut gives
    # the draft's configuration and the main model's shared tensors.
    draft = cut_decoder_only(main_model, tuple(range(record["decoder_layers"])))
    draft.config.tie_word_embeddings = False
    draft.proj_out = torch.nn.Linear(draft.config.d_model, draft.config.vocab_size, bias=False)
    draft.proj_out.weight = torch.nn.Parameter(main_model.model.decoder.embed_tokens.weight.detach().clone())
    expected = {tensor for tensor in draft.state_dict() if tensor not in SHARED}
    if set(tensors) != expected:
        raise ValueError(f"{weights}: tensors {sorted(set(tensors) ^ expected)} do not fit a draft of {main!r}")
    draft.load_state_dict({tensor: value.to(torch.float32) for tensor, value in tensors.items()}, strict=False)
    draft.save_pretrained(out)
    processor.save_pretrained(out)
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": np.asarray(token_ids).tolist()}))
    measured = record.get("heldout", {}).get("languages", {})
    write_measured_acceptance(out, {language: figures["acceptance"] for language, figures in measured.items()})


def default_assistant(main: str) -> str | None:
    """What ``main`` drafts with unless told otherwise: its shipped draft, if one ships."""
    return str(shipped_draft(main)) if has_shipped_draft(main) else None


def default_routes(main: str) -> tuple[tuple[tuple[str, ...], str], ...]:
    """The drafts routed by language beside ``main``'s shipped draft unless told otherwise
    (``ExportRequest.routes``): each named draft that ships for it, for the languages it was packed for
    that no draft packed for fewer languages also serves (``narrowest_routes``)."""
    packed = {name: tuple(shipped_record(main, name)["route"]) for name in routed_names(main)}
    return tuple((languages, str(shipped_draft(main, name))) for name, languages in narrowest_routes(packed).items())


def narrowest_routes(packed: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Each language to the draft packed for the fewest languages among those packed for it (ties: the
    first name), since a draft that trained its steps on fewer languages agrees more in each of them;
    drafts left with no language are dropped. ``packed``: name to the languages it was packed for."""
    owner = {}
    for name, languages in sorted(packed.items(), key=lambda item: (len(item[1]), item[0])):
        for language in languages:
            owner.setdefault(language, name)
    narrowed = {name: tuple(lang for lang in languages if owner[lang] == name) for name, languages in packed.items()}
    return {name: languages for name, languages in narrowed.items() if languages}
