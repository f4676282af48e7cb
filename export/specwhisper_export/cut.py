"""Smaller Whisper models cut from a bigger one's own layers.

These are the starting point of a trained draft (distil-whisper initialises its decoder from the
teacher's layers the same way) and, untrained, assistants for tests: whatever they propose, the
output must stay identical to the main model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import nn
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_export.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_export.presets import load_whisper, resolve_checkpoint


def _keep(layers: nn.ModuleList, indices: Sequence[int]) -> nn.ModuleList:
    if not indices or any(not 0 <= i < len(layers) for i in indices):
        raise ValueError(f"layer indices {list(indices)} out of range for {len(layers)} layers")
    kept = nn.ModuleList(copy.deepcopy(layers[i]) for i in indices)
    # transformers' KV cache is indexed by each attention's layer_idx: renumber the kept layers.
    for new_index, layer in enumerate(kept):
        for attention in (getattr(layer, "self_attn", None), getattr(layer, "encoder_attn", None)):
            if attention is not None:
                attention.layer_idx = new_index
    return kept


def cut_full_model(
    model: WhisperForConditionalGeneration, encoder_layers: Sequence[int], decoder_layers: Sequence[int]
) -> WhisperForConditionalGeneration:
    """A full Whisper (own encoder) keeping only the given encoder and decoder layers."""
    small = copy.deepcopy(model).eval()
    small.config.encoder_layers, small.config.decoder_layers = len(encoder_layers), len(decoder_layers)
    small.model.encoder.layers = _keep(model.model.encoder.layers, encoder_layers)
    small.model.decoder.layers = _keep(model.model.decoder.layers, decoder_layers)
    return small


def cut_decoder_only(model: WhisperForConditionalGeneration, decoder_layers: Sequence[int]) -> WhisperForCausalLM:
    """A decoder-only assistant (distil-whisper style) reading the main model's encoder output."""
    config = copy.deepcopy(model.config)
    config.decoder_layers = len(decoder_layers)
    config.is_encoder_decoder = False
    small = WhisperForCausalLM(config).eval()
    decoder = small.model.decoder
    decoder.embed_tokens.load_state_dict(model.model.decoder.embed_tokens.state_dict())
    decoder.embed_positions.load_state_dict(model.model.decoder.embed_positions.state_dict())
    decoder.layer_norm.load_state_dict(model.model.decoder.layer_norm.state_dict())
    decoder.layers = _keep(model.model.decoder.layers, decoder_layers)
    small.proj_out.load_state_dict(model.proj_out.state_dict())
    small.generation_config = copy.deepcopy(model.generation_config)
    return small


def cached_cut(
    main: str,
    form: Literal["decoder_only", "full"],
    decoder_layers: Sequence[int],
    encoder_layers: Sequence[int] = (),
) -> Path:
    """A cut of ``main`` saved as a checkpoint directory (with the main processor), built once."""
    checkpoint = resolve_checkpoint(main)
    key = input_key("cut", checkpoint_identity(checkpoint), form, list(decoder_layers), list(encoder_layers))

    def build(directory: Path) -> None:
        model, processor = load_whisper(checkpoint)
        if form == "full":
            small = cut_full_model(model, encoder_layers, decoder_layers)
        else:
            small = cut_decoder_only(model, decoder_layers)
        small.save_pretrained(directory)
        processor.save_pretrained(directory)

    return cached_dir("cut", key, build)
