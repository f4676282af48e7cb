"""The torch modules that define the ONNX graphs' interfaces.

Three graphs per model (the decoder-only assistant has no encoder of its own):

* ``encoder``: log-mel ``input_features [B, n_mels, 3000]`` -> ``encoder_hidden_states [B, 1500, d]``.
* ``cross_kv``: ``encoder_hidden_states`` -> ``cross_key_i, cross_value_i [B, H, 1500, Dh]`` for every
  decoder layer ``i``, run once per 30 s window instead of at every decoding step.
* ``decoder``: ``S`` new tokens per row, a self-attention KV cache and the cross K/V -> logits for
  the new tokens (over the whole vocabulary, or a trained draft's subset of it) and their
  self-attention K/V.
* ``alignment`` (the main model only): a whole token sequence and the encoder output -> its logits
  and the alignment heads' cross-attention scores, from which word timestamps are made.

The decoder's cache is a buffer the caller owns, ``past_key_i / past_value_i [B, H, C, Dh]`` per
layer, passed whole and never copied by the graph: ``attention_mask [B, C + S]`` says which of the
``C`` cache slots each row may attend to and which of its ``S`` new tokens are real (rows of a batch
may sit at different lengths and propose different numbers of tokens); ``position_ids [B, S]`` give
each new token its own position. The graph returns only the new tokens' K/V
(``new_key_i / new_value_i [B, H, S, Dh]``): the caller writes them into its buffer, and rolls back
rejected draft tokens by moving a length, with no recomputation and no cache copies.
Attention over the cache and over the new tokens is computed as two products whose scores are
joined before the softmax, so the graph reads the cache in place instead of concatenating it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperAttention, WhisperDecoder, WhisperEncoder


class EncoderGraph(nn.Module):
    """Whisper's audio encoder, returning a plain tensor."""

    def __init__(self, encoder: WhisperEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        # Features stay float32 at the interface whatever precision the weights are in.
        dtype = self.encoder.conv1.weight.dtype
        return self.encoder(input_features.to(dtype)).last_hidden_state


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, d] -> [B, H, T, Dh]."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, d]."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class CrossKVGraph(nn.Module):
    """Projects the encoder output to every decoder layer's cross-attention keys and values."""

    def __init__(self, decoder: WhisperDecoder) -> None:
        super().__init__()
        self.layers = decoder.layers
        self.num_heads = decoder.config.decoder_attention_heads

    def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for layer in self.layers:
            attn: WhisperAttention = layer.encoder_attn
            out.append(_split_heads(attn.k_proj(encoder_hidden_states), self.num_heads))
            out.append(_split_heads(attn.v_proj(encoder_hidden_states), self.num_heads))
        return tuple(out)


def _attend(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    masks: list[torch.Tensor],
) -> torch.Tensor:
    """Softmax attention over several key/value blocks whose scores are joined before the softmax.

    ``q`` is already scaled. Each mask is boolean and broadcastable to its block's scores. Masked
    scores take the dtype's lowest value rather than -inf so that a row with nothing to attend to
    (a padding token) gives finite values that cannot turn its neighbours into NaN.
    """
    lowest = torch.finfo(q.dtype).min
    scores = [
        torch.where(mask, torch.matmul(q, key.transpose(-1, -2)), lowest) for key, mask in zip(keys, masks, strict=True)
    ]
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    sizes = [key.shape[-2] for key in keys]
    parts = torch.split(probs, sizes, dim=-1)
    out = torch.matmul(parts[0], values[0])
    for part, value in zip(parts[1:], values[1:], strict=True):
        out = out + torch.matmul(part, value)
    return out


class TrimmedHead(nn.Module):
    """An output projection over a subset of the vocabulary: logits for ``token_ids`` only.

    A small draft decoder spends most of its time in the output projection (``d x 51865`` for
    Whisper's multilingual vocabulary); projecting onto the ids the main model actually says is what
    makes drafting cheap. The graph returns just those scores: scattering them into a full-vocabulary
    row inside the graph (an ``Expand``, two transposes and a ``ScatterND`` over 51865 columns) was a
    noticeable share of a draft step, and the engine does it on the host for a fraction of that
    (``DecoderFacts.logit_ids_file`` says which ids the columns are).
    """

    def __init__(self, proj_out: nn.Linear, token_ids: list[int]) -> None:
        super().__init__()
        # The ids of the logits' columns, in order (not a buffer: the graph never reads them).
        self.token_ids = np.asarray(sorted(set(token_ids)), dtype=np.int64)
        rows = proj_out.weight.detach()[torch.from_numpy(self.token_ids)]
        self.weight = nn.Parameter(rows.clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden, self.weight.t())


class DecoderGraph(nn.Module):
    """One decoding step over ``S`` new tokens per row, reading the caller's KV cache in place.

    Positional arguments after the first three come per layer, in this order:
    ``past_key_i, past_value_i`` for all layers, then ``cross_key_i, cross_value_i`` for all layers.
    """

    def __init__(
        self, decoder: WhisperDecoder, proj_out: nn.Module, alignment_heads: tuple[tuple[int, int], ...] = ()
    ) -> None:
        """``alignment_heads``: (layer, head) pairs whose cross-attention scores (before the softmax)
        are returned instead of the new K/V."""
        super().__init__()
        self.decoder = decoder
        self.proj_out = proj_out
        self.num_heads = decoder.config.decoder_attention_heads
        self.alignment_heads = alignment_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n_layers = len(self.decoder.layers)
        past, cross = caches[: 2 * n_layers], caches[2 * n_layers :]
        new_len = input_ids.shape[1]
        past_len = past[0].shape[2]

        valid = attention_mask.bool()[:, None, None, :]
        past_mask = valid[..., :past_len]
        causal = torch.ones(new_len, new_len, dtype=torch.bool, device=input_ids.device).tril()
        new_mask = valid[..., past_len:] & causal

        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids) * decoder.embed_scale
        hidden = hidden + decoder.embed_positions.weight[position_ids]

        new_kv: list[torch.Tensor] = []
        captured: list[torch.Tensor] = []
        for i, layer in enumerate(decoder.layers):
            attn: WhisperAttention = layer.self_attn
            x = layer.self_attn_layer_norm(hidden)
            q = _split_heads(attn.q_proj(x) * attn.scaling, self.num_heads)
            k = _split_heads(attn.k_proj(x), self.num_heads)
            v = _split_heads(attn.v_proj(x), self.num_heads)
            new_kv += [k, v]
            ctx = _attend(q, [past[2 * i], k], [past[2 * i + 1], v], [past_mask, new_mask])
            hidden = hidden + attn.out_proj(_merge_heads(ctx))

            cross_attn: WhisperAttention = layer.encoder_attn
            x = layer.encoder_attn_layer_norm(hidden)
            q = _split_heads(cross_attn.q_proj(x) * cross_attn.scaling, self.num_heads)
            scores = torch.matmul(q, cross[2 * i].transpose(-1, -2))
            captured += [scores[:, head] for layer_index, head in self.alignment_heads if layer_index == i]
            ctx = torch.matmul(torch.softmax(scores, dim=-1), cross[2 * i + 1])
            hidden = hidden + cross_attn.out_proj(_merge_heads(ctx))

            x = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))

        # Logits stay float32 at the interface whatever precision the weights are in.
        logits = self.proj_out(decoder.layer_norm(hidden)).float()
        if self.alignment_heads:
            return logits, torch.stack(captured, dim=1).float()
        return (logits, *new_kv)


class AlignmentGraph(nn.Module):
    """The main decoder over one whole token sequence (prompt, text, end of text), with no cache:
    its logits ``[1, T, V]`` and the alignment heads' cross-attention scores ``[1, A, T, frames]``
    (before the softmax, as openai/whisper's ``timing.py`` reads them), from the encoder output."""

    def __init__(self, decoder: WhisperDecoder, proj_out: nn.Module, alignment_heads: tuple[tuple[int, int], ...]):
        super().__init__()
        self.cross_kv = CrossKVGraph(decoder)
        self.decoder = DecoderGraph(decoder, proj_out, alignment_heads)
        self.heads = decoder.config.decoder_attention_heads
        self.head_dim = decoder.config.d_model // self.heads
        self.layers = len(decoder.layers)

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = input_ids.shape[1]
        dtype = self.decoder.decoder.embed_tokens.weight.dtype
        cross = self.cross_kv(encoder_hidden_states.to(dtype))
        empty = [input_ids.new_zeros((1, self.heads, 0, self.head_dim), dtype=dtype) for _ in range(2 * self.layers)]
        positions = torch.arange(length, device=input_ids.device)[None]
        mask = torch.ones(1, length, dtype=torch.int64, device=input_ids.device)
        return self.decoder(input_ids, positions, mask, *empty, *cross)
