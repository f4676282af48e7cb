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

import numpy as np
import torch
from torch.export import Dim
from transformers import WhisperForCausalLM, WhisperForConditionalGeneration

from specwhisper_backend.facts import cache_names
from specwhisper_export.graphs import AlignmentGraph, CrossKVGraph, DecoderGraph, EncoderGraph, TrimmedHead

OPSET = 18
IR_VERSION = 10  # what torch.onnx.export writes with OPSET; ONNX Runtime 1.20 loads up to IR 10
# The exporter logs a warning per torchvision operator it cannot register; Whisper uses none.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
ENCODER_FILE = "encoder.onnx"
CROSS_KV_FILE = "cross_kv.onnx"
DECODER_FILE = "decoder.onnx"
ALIGNMENT_FILE = "alignment.onnx"
# Beside a decoder whose head covers a vocabulary subset: the ids its logits' columns stand for.
LOGIT_IDS_FILE = "logit_ids.npy"


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
        cache_names(layers, "cross"),
        ({0: Dim("batch"), 1: Dim("enc_len")},),
    )


def export_decoder(
    model: WhisperForConditionalGeneration | WhisperForCausalLM, path: Path, token_ids: list[int] | None = None
) -> None:
    """``token_ids``: the vocabulary subset a trained draft's head covers (None: the whole vocabulary);
    its logits then have one column per id, in the order saved in ``LOGIT_IDS_FILE`` beside ``path``."""
    decoder, proj_out = _decoder_parts(model)
    head = proj_out
    if token_ids:
        head = TrimmedHead(proj_out, token_ids)
        np.save(Path(path).parent / LOGIT_IDS_FILE, head.token_ids)
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
            *cache_names(shape.layers, "past"),
            *cache_names(shape.layers, "cross"),
        ],
        ["logits", *cache_names(shape.layers, "new")],
        ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: Dim("total")}, tuple(caches)),
    )


def export_alignment(model: WhisperForConditionalGeneration, heads: tuple[tuple[int, int], ...], path: Path) -> None:
    """The main decoder over a whole token sequence with its alignment heads' cross-attention scores
    (:class:`AlignmentGraph`): ``input_ids [1, T]``, ``encoder_hidden_states [1, frames, d]`` ->
    ``logits [1, T, V]``, ``scores [1, heads, T, frames]``."""
    decoder, proj_out = _decoder_parts(model)
    enc_len = model.config.max_source_positions
    args = (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, enc_len, model.config.d_model))
    _export(
        AlignmentGraph(decoder, proj_out, heads),
        args,
        path,
        ["input_ids", "encoder_hidden_states"],
        ["logits", "scores"],
        ({1: Dim("tokens", min=2, max=model.config.max_target_positions)}, {1: Dim("enc_len")}),
    )


def export_kv_writer(path: Path, dtype: str) -> None:
    """The graph that keeps KV caches on the device: ``ScatterND`` of a step's new K/V
    ``[N, B, H, S, D]`` into the stacked caches ``[N, B, H, L, D]`` at each row's slots
    ``starts[b] + s`` (clamped to the last slot, which the engine keeps as scratch for padding).

    Bound with its output on its input's buffer, ONNX Runtime updates the caches in place (the
    kernel copies only when the buffers differ), so a step moves only the new tokens' K/V.
    Written with ``onnx.helper``: it is index plumbing, not a torch module.
    """
    import onnx
    from onnx import TensorProto, helper

    element = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return helper.make_node("Constant", [], [name], value=tensor)

    def axis_index(name: str, size: str, shape: list[int]) -> list[onnx.NodeProto]:
        """``name``: 0..size-1 laid along one axis of ``[N, B, H, S, 1]``, broadcast to all of it."""
        return [
            helper.make_node("Range", ["zero", size, "one"], [f"{name}_range"]),
            const(f"{name}_shape", shape),
            helper.make_node("Reshape", [f"{name}_range", f"{name}_shape"], [f"{name}_line"]),
            helper.make_node("Expand", [f"{name}_line", "index_shape"], [name]),
        ]

    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        const("unit", [1]),
        const("first", [0]),
        const("fourth", [4]),
        helper.make_node("Shape", ["new"], ["new_shape"]),
        helper.make_node("Shape", ["cache"], ["cache_shape"]),
        helper.make_node("Slice", ["new_shape", "first", "fourth"], ["lead"]),
        helper.make_node("Concat", ["lead", "unit"], ["index_shape"], axis=0),  # [N, B, H, S, 1]
    ]
    for axis, size in enumerate(("n", "b", "h", "s")):
        nodes += [
            const(f"at_{size}", [axis]),
            helper.make_node("Gather", ["new_shape", f"at_{size}"], [f"{size}_1"], axis=0),
            helper.make_node("Squeeze", [f"{size}_1"], [size]),
        ]
    nodes += axis_index("layer_index", "n", [-1, 1, 1, 1, 1])
    nodes += axis_index("row_index", "b", [1, -1, 1, 1, 1])
    nodes += axis_index("head_index", "h", [1, 1, -1, 1, 1])
    nodes += axis_index("step_index", "s", [1, 1, 1, -1, 1])
    nodes += [
        const("row_shape", [1, -1, 1, 1, 1]),
        helper.make_node("Reshape", ["starts", "row_shape"], ["row_starts"]),
        helper.make_node("Add", ["row_starts", "step_index"], ["wanted_slot"]),
        const("at_l", [3]),
        helper.make_node("Gather", ["cache_shape", "at_l"], ["slots"], axis=0),
        helper.make_node("Sub", ["slots", "unit"], ["last_slot"]),
        helper.make_node("Min", ["wanted_slot", "last_slot"], ["slot_index"]),
        helper.make_node("Concat", ["layer_index", "row_index", "head_index", "slot_index"], ["indices"], axis=-1),
        helper.make_node("ScatterND", ["cache", "indices", "new"], ["cache_out"]),
    ]
    dims = {"cache": ["layers_x2", "batch", "heads", "slots", "head_dim"]}
    graph = helper.make_graph(
        nodes,
        "kv_writer",
        [
            helper.make_tensor_value_info("cache", element, dims["cache"]),
            helper.make_tensor_value_info("new", element, ["layers_x2", "batch", "heads", "new_tokens", "head_dim"]),
            helper.make_tensor_value_info("starts", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("cache_out", element, dims["cache"])],
    )
    # The IR version of the torch-exported graphs: a newer `onnx` would stamp its own, which an older
    # ONNX Runtime (the one a Triton image ships, say) refuses to load.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
