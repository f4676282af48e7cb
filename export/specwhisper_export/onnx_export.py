"""Export a Whisper model's encoder, cross-K/V projection and decoder step to ONNX.

The graphs' interfaces are defined in :mod:`specwhisper_export.graphs`; this module names their
inputs and outputs, marks which dimensions are dynamic and runs the torch exporter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_export.graphs import CrossKVGraph, DecoderGraph, EncoderGraph, TrimmedHead

OPSET = 18
# The exporter logs a warning per torchvision operator it cannot register; Whisper uses none.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
ENCODER_FILE = "encoder.onnx"
CROSS_KV_FILE = "cross_kv.onnx"
DECODER_FILE = "decoder.onnx"


@dataclass(frozen=True)
class DecoderShape:
    """What the engine needs to size a decoder's caches and read its graph."""

    layers: int
    heads: int
    head_dim: int
    d_model: int
    vocab_size: int


def decoder_shape(model: WhisperForConditionalGeneration | WhisperForCausalLM) -> DecoderShape:
    cfg = model.config
    return DecoderShape(
        layers=cfg.decoder_layers,
        heads=cfg.decoder_attention_heads,
        head_dim=cfg.d_model // cfg.decoder_attention_heads,
        d_model=cfg.d_model,
        vocab_size=cfg.vocab_size,
    )


def cache_input_names(layers: int, prefix: str) -> list[str]:
    """``<prefix>_key_0, <prefix>_value_0, <prefix>_key_1, ...``: the order the graphs use."""
    return [f"{prefix}_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]


def _export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple,
) -> None:
    # The exporter reports every stage on stdout and warns that equal dynamic axes share a name;
    # the caller shows one progress bar instead.
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
        )


def _decoder_parts(model: WhisperForConditionalGeneration | WhisperForCausalLM):
    # Both classes keep the decoder at `model.decoder` (WhisperForCausalLM through a wrapper).
    return model.model.decoder, model.proj_out


def export_encoder(model: WhisperForConditionalGeneration, path: Path) -> None:
    cfg = model.config
    frames = 2 * cfg.max_source_positions
    features = torch.zeros(2, cfg.num_mel_bins, frames, dtype=torch.float32)
    _export(
        EncoderGraph(model.model.encoder),
        (features,),
        path,
        ["input_features"],
        ["encoder_hidden_states"],
        ({0: Dim("batch")},),
    )


def export_cross_kv(model: WhisperForConditionalGeneration | WhisperForCausalLM, encoder_dim: int, path: Path) -> None:
    """``encoder_dim`` is the width of the encoder output this decoder reads (the main one's, for a
    decoder-only assistant)."""
    decoder, _ = _decoder_parts(model)
    dtype = decoder.embed_tokens.weight.dtype
    states = torch.zeros(2, model.config.max_source_positions, encoder_dim, dtype=dtype)
    layers = model.config.decoder_layers
    _export(
        CrossKVGraph(decoder),
        (states,),
        path,
        ["encoder_hidden_states"],
        cache_input_names(layers, "cross"),
        ({0: Dim("batch"), 1: Dim("enc_len")},),
    )


def export_decoder(
    model: WhisperForConditionalGeneration | WhisperForCausalLM, path: Path, token_ids: list[int] | None = None
) -> None:
    """``token_ids``: the vocabulary subset a trained draft's head covers (None: the whole vocabulary)."""
    decoder, proj_out = _decoder_parts(model)
    head = TrimmedHead(proj_out, token_ids) if token_ids else proj_out
    shape = decoder_shape(model)
    dtype = decoder.embed_tokens.weight.dtype
    batch, new_len, past_len, enc_len = 2, 3, 5, model.config.max_source_positions

    def cache(length: int) -> torch.Tensor:
        # Distinct tensors: the exporter merges inputs that are the same tensor object.
        return torch.zeros(batch, shape.heads, length, shape.head_dim, dtype=dtype)

    args = (
        torch.zeros(batch, new_len, dtype=torch.int64),
        torch.arange(new_len).repeat(batch, 1) + past_len,
        torch.ones(batch, past_len + new_len, dtype=torch.int64),
        *[cache(past_len) for _ in range(2 * shape.layers)],
        *[cache(enc_len) for _ in range(2 * shape.layers)],
    )
    b, s = Dim("batch"), Dim("new_tokens")
    past = Dim("past_len", min=0, max=model.config.max_target_positions)
    enc = Dim("enc_len")
    caches = [{0: b, 2: past}] * (2 * shape.layers) + [{0: b, 2: enc}] * (2 * shape.layers)
    _export(
        DecoderGraph(decoder, head),
        args,
        path,
        [
            "input_ids",
            "position_ids",
            "attention_mask",
            *cache_input_names(shape.layers, "past"),
            *cache_input_names(shape.layers, "cross"),
        ],
        ["logits", *cache_input_names(shape.layers, "new")],
        ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: Dim("total")}, tuple(caches)),
    )
