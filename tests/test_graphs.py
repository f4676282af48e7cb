"""The ONNX graphs against the torch model they were exported from, on a small random Whisper.

Fast checks of the graph interfaces (per-row positions and masks, cache reuse, rollback); the same
properties are checked on real weights and real speech in test_export_base.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from specwhisper_backend.decoder_session import DecoderSession, DeviceCache
from specwhisper_backend.facts import KV_WRITER_FILE, DecoderFacts
from specwhisper_backend.runtime import execution_providers
from specwhisper_export import onnx_export
from tests.toy_model import cached_export, tiny_config

LAYERS, HEADS, WIDTH, VOCAB = 3, 4, 64, 300


KEPT = [299, 2, 17, 5]  # a trimmed head's ids, unsorted: its columns follow the saved ids, not their order


@pytest.fixture(scope="module")
def tiny_random():
    """A small random Whisper and its graphs (the decoder also with a head trimmed to ``KEPT``)."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=VOCAB, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = WhisperForConditionalGeneration(config).eval()

    def export(folder):
        onnx_export.export_encoder(model, folder / onnx_export.ENCODER_FILE)
        onnx_export.export_cross_kv(model, WIDTH, folder / onnx_export.CROSS_KV_FILE)
        onnx_export.export_decoder(model, folder / onnx_export.DECODER_FILE)
        onnx_export.export_kv_writer(folder / KV_WRITER_FILE, "float32")
        trimmed = folder / "trimmed"
        trimmed.mkdir()
        onnx_export.export_decoder(model, trimmed / onnx_export.DECODER_FILE, token_ids=KEPT)
        # The cross K/V graph and its weights file, and the device caches' writer, beside it.
        for graph_file in [*folder.glob(onnx_export.CROSS_KV_FILE + "*"), folder / KV_WRITER_FILE]:
            shutil.copy(graph_file, trimmed)

    return model, cached_export(export, "graphs' tiny random", VOCAB, KEPT)


CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu's CUDA execution provider and a GPU")

# Where the decoder keeps its KV caches: NumPy, or an ONNX Runtime device buffer through IO
# binding: the GPU path, run on the CPU device everywhere and on CUDA where there is one.
CACHE_DEVICES = pytest.mark.parametrize("cache_device", ["cpu", "cpu-bound", pytest.param("cuda", marks=needs_cuda)])


def _decoder(folder, dtype="float32", cache_device="cpu", logit_ids_file=None, device="cpu") -> DecoderSession:
    facts = DecoderFacts(
        layers=LAYERS,
        heads=HEADS,
        head_dim=WIDTH // HEADS,
        cross_kv_file=onnx_export.CROSS_KV_FILE,
        decoder_file=onnx_export.DECODER_FILE,
        dtype=dtype,
        logit_ids_file=logit_ids_file,
    )
    providers = execution_providers("gpu" if cache_device == "cuda" else device)
    return DecoderSession(facts, folder, 448, providers=providers, cache_device=cache_device, vocab_size=VOCAB)


def test_gpu_is_refused_without_the_cuda_provider(monkeypatch):
    """Asked for a GPU, a CPU-only ONNX Runtime would fall back to the CPU silently: refused instead."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        execution_providers("gpu")
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        execution_providers("cuda")


@needs_cuda
def test_a_cuda_session_keeps_its_caches_on_its_gpu(tiny_random):
    _, folder = tiny_random
    decoder = _decoder(folder, cache_device=None, device="gpu")
    assert isinstance(decoder.cache, DeviceCache)
    assert (decoder.cache.device, decoder.cache.device_id) == ("cuda", 0)


def test_encoder_matches_torch(tiny_random):
    model, folder = tiny_random
    features = torch.randn(2, 80, 3000)
    ours = ort.InferenceSession(str(folder / onnx_export.ENCODER_FILE)).run(None, {"input_features": features.numpy()})
    with torch.no_grad():
        reference = model.model.encoder(features).last_hidden_state.numpy()
    np.testing.assert_allclose(ours[0], reference, atol=1e-4)


@CACHE_DEVICES
def test_rows_at_different_lengths_with_rollback(tiny_random, cache_device):
    """Two rows fed unequal chunks (padded), one rolled back and refed: logits equal a full forward."""
    model, folder = tiny_random
    torch.manual_seed(1)
    states = torch.randn(2, 1500, WIDTH)
    ids = torch.randint(3, 300, (2, 80))
    with torch.no_grad():
        reference = model(encoder_outputs=(states,), decoder_input_ids=ids).logits.numpy()
    decoder = _decoder(folder, cache_device=cache_device)
    decoder.start(states.numpy())

    first = decoder.forward(ids[:, :5].numpy(), counts=np.array([5, 3]))
    np.testing.assert_allclose(first[0], reference[0, :5], atol=1e-4)
    np.testing.assert_allclose(first[1, :3], reference[1, :3], atol=1e-4)

    chunk = np.zeros((2, 6), dtype=np.int64)
    chunk[0, :4], chunk[1] = ids[0, 5:9], ids[1, 3:9]
    second = decoder.forward(chunk, counts=np.array([4, 6]))
    np.testing.assert_allclose(second[0, :4], reference[0, 5:9], atol=1e-4)
    np.testing.assert_allclose(second[1], reference[1, 3:9], atol=1e-4)
    assert decoder.lengths.tolist() == [9, 9]

    # Reject the last two tokens of row 0 (as after a failed draft), then run both rows past the
    # first cache capacity step, so the cache grows while the rows sit at different lengths.
    decoder.truncate(np.array([7, 9]))
    rest = np.zeros((2, 73), dtype=np.int64)
    rest[0], rest[1, :71] = ids[0, 7:80], ids[1, 9:80]
    third = decoder.forward(rest, counts=np.array([73, 71]))
    np.testing.assert_allclose(third[0], reference[0, 7:80], atol=1e-4)
    np.testing.assert_allclose(third[1, :71], reference[1, 9:80], atol=1e-4)

    # A draft catching up reads only each row's last real token: rows fed 3 and 1 of 3 tokens.
    decoder.truncate(np.array([74, 77]))
    catch_up = np.zeros((2, 3), dtype=np.int64)
    catch_up[0], catch_up[1, 0] = ids[0, 74:77], ids[1, 77]
    last = decoder.forward(catch_up, counts=np.array([3, 1]), last_only=True)
    assert last.shape == (2, reference.shape[-1])
    np.testing.assert_allclose(last, reference[[0, 1], [76, 77]], atol=1e-4)


@CACHE_DEVICES
def test_kept_rows_go_on_with_their_own_caches(tiny_random, cache_device):
    """Three rows at different lengths; the last two are kept and decode on as if alone."""
    model, folder = tiny_random
    torch.manual_seed(2)
    states = torch.randn(3, 1500, WIDTH)
    ids = torch.randint(3, 300, (3, 20))
    with torch.no_grad():
        reference = model(encoder_outputs=(states,), decoder_input_ids=ids).logits.numpy()
    decoder = _decoder(folder, cache_device=cache_device)
    decoder.start(states.numpy())
    decoder.forward(ids[:, :6].numpy(), counts=np.array([6, 4, 5]))
    decoder.keep_rows([1, 2])
    assert decoder.lengths.tolist() == [4, 5]
    chunk = np.stack([ids[1, 4:9].numpy(), ids[2, 5:10].numpy()])
    logits = decoder.forward(chunk)
    np.testing.assert_allclose(logits[0], reference[1, 4:9], atol=1e-4)
    np.testing.assert_allclose(logits[1], reference[2, 5:10], atol=1e-4)
    for wrong in ([2], [1, 0], [1, 1]):
        with pytest.raises(ValueError, match="distinct rows of a batch of 2, each at or after its slot"):
            decoder.keep_rows(wrong)


@CACHE_DEVICES
def test_rows_join_and_leave_a_running_batch(tiny_random, cache_device):
    """A row joins a batch mid-way and decodes as if alone; another leaves and the last row moves
    into its slot; the rows already there never notice. A row that asks for more encoder frames
    than the batch reads makes every row read that many; one that asks for fewer reads the batch's."""
    model, folder = tiny_random
    torch.manual_seed(3)
    states = torch.randn(4, 1500, WIDTH)
    ids = torch.randint(3, 300, (4, 20))

    def reference(row: int, frames: int) -> np.ndarray:
        with torch.no_grad():
            cut = states[row : row + 1, :frames]
            return model(encoder_outputs=(cut,), decoder_input_ids=ids[row : row + 1]).logits[0].numpy()

    decoder = _decoder(folder, cache_device=cache_device)
    decoder.start(states[:1].numpy(), frames=600)
    decoder.add_rows(states[1:2].numpy(), frames=900)  # before any step: both rows read 900 frames
    assert decoder.encoder_frames == 900
    decoder.forward(ids[:2, :5].numpy(), counts=np.array([5, 3]))
    decoder.add_rows(states[2:3].numpy(), frames=300)  # joins a running batch, reads its 900
    assert decoder.encoder_frames == 900 and decoder.lengths.tolist() == [5, 3, 0]
    logits = decoder.forward(np.stack([ids[0, 5:9].numpy(), ids[1, 3:7].numpy(), ids[2, 0:4].numpy()]))
    for row, start in ((0, 5), (1, 3), (2, 0)):
        np.testing.assert_allclose(logits[row], reference(row, 900)[start : start + 4], atol=1e-4)

    decoder.keep_rows([2, 1])  # row 0 leaves; the last row takes its slot
    assert decoder.lengths.tolist() == [4, 7]
    logits = decoder.forward(np.stack([ids[2, 4:8].numpy(), ids[1, 7:11].numpy()]))
    np.testing.assert_allclose(logits[0], reference(2, 900)[4:8], atol=1e-4)
    np.testing.assert_allclose(logits[1], reference(1, 900)[7:11], atol=1e-4)
    decoder.add_rows(states[3:].numpy(), frames=1500)  # every row now reads all frames
    assert decoder.encoder_frames == 1500 and decoder.batch_size == 3
    logits = decoder.forward(np.stack([ids[2, 8:9].numpy(), ids[1, 11:12].numpy(), ids[3, 0:1].numpy()]))
    np.testing.assert_allclose(logits[2], reference(3, 1500)[:1], atol=1e-4)
    assert np.all(np.isfinite(logits))


@CACHE_DEVICES
def test_single_token_steps_match_one_pass(tiny_random, cache_device):
    model, folder = tiny_random
    states = torch.randn(1, 1500, WIDTH)
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        reference = model(encoder_outputs=(states,), decoder_input_ids=ids).logits.numpy()
    decoder = _decoder(folder, cache_device=cache_device)
    decoder.start(states.numpy())
    steps = [decoder.forward(ids[:, i : i + 1].numpy())[0, 0] for i in range(12)]
    np.testing.assert_allclose(np.stack(steps), reference[0], atol=1e-4)


def test_every_graph_has_the_ir_version_torch_writes(tiny_random):
    """The hand-built kv_writer too: stamped with the newest IR of the ``onnx`` that built it, it was
    refused by an older ONNX Runtime (IR 14 against 1.31's 13, on a GPU machine)."""
    _, folder = tiny_random
    versions = {f.name: onnx.load(f, load_external_data=False).ir_version for f in folder.glob("*.onnx")}
    assert len(versions) == 4 and set(versions.values()) == {onnx_export.IR_VERSION}, versions


def test_kv_writer_scatters_each_rows_new_tokens_in_place(tiny_random):
    """New K/V land at each row's own slots, padding past the end goes to the last (scratch) slot,
    and with the output bound on the input buffer nothing else in it changes."""
    _, folder = tiny_random
    session = ort.InferenceSession(str(folder / KV_WRITER_FILE))
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((6, 3, 2, 10, 4)).astype(np.float32)
    new = rng.standard_normal((6, 3, 2, 3, 4)).astype(np.float32)
    starts = np.array([0, 4, 8])
    expected = cache.copy()
    for row, start in enumerate(starts):
        for step in range(3):
            expected[:, row, :, min(start + step, 9)] = new[:, row, :, step]
    buffer = ort.OrtValue.ortvalue_from_numpy(cache.copy())
    binding = session.io_binding()
    binding.bind_ortvalue_input("cache", buffer)
    binding.bind_cpu_input("new", new)
    binding.bind_cpu_input("starts", starts)
    binding.bind_ortvalue_output("cache_out", buffer)
    session.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == buffer.data_ptr()
    got = buffer.numpy()
    np.testing.assert_array_equal(got[:, :, :, :9], expected[:, :, :, :9])
    scratch = got[:, 2, :, 9]  # row 2's two padded steps both went there, in either order
    assert np.array_equal(scratch, new[:, 2, :, 1]) or np.array_equal(scratch, new[:, 2, :, 2])


def test_truncate_cannot_grow(tiny_random):
    _, folder = tiny_random
    decoder = _decoder(folder)
    decoder.start(np.zeros((1, 1500, WIDTH), dtype=np.float32))
    decoder.forward(np.array([[5, 6]]))
    with pytest.raises(ValueError, match="back"):
        decoder.truncate(np.array([3]))


def test_fp16_export_matches_fp32(tiny_random):
    """fp16 graphs (for GPU deployments) keep float32 interfaces and stay close to fp32."""
    model, _ = tiny_random
    half = WhisperForConditionalGeneration(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.half()
    folder = cached_export(lambda out: onnx_export.export_encoder(half, out / onnx_export.ENCODER_FILE), "fp16", VOCAB)
    providers = execution_providers("gpu" if CUDA else "cpu")
    session = ort.InferenceSession(str(folder / onnx_export.ENCODER_FILE), providers=providers)
    assert session.get_inputs()[0].type == "tensor(float)"
    features = torch.randn(1, 80, 3000)
    try:
        ours = session.run(None, {"input_features": features.numpy()})[0]
    except Exception as error:  # ONNX Runtime's CPU provider lacks some float16 kernels
        pytest.skip(f"fp16 graph not runnable on this CPU provider: {error}")
    with torch.no_grad():
        reference = model.model.encoder(features).last_hidden_state.numpy()
    np.testing.assert_allclose(ours.astype(np.float32), reference, atol=5e-2, rtol=5e-2)


@CACHE_DEVICES
def test_trimmed_head_scores_only_its_vocabulary(tiny_random, cache_device):
    """A draft head over a vocabulary subset: the graph returns those ids' logits only (no scatter
    to 51865 columns in the graph); the session places them by id, the lowest value elsewhere."""
    model, folder = tiny_random
    trimmed, kept = folder / "trimmed", KEPT
    states = torch.randn(1, 1500, WIDTH)
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        reference = model(encoder_outputs=(states,), decoder_input_ids=ids).logits.numpy()
    graph = ort.InferenceSession(str(trimmed / onnx_export.DECODER_FILE))
    assert graph.get_outputs()[0].name == "logits" and "ScatterND" not in {
        n.op_type for n in onnx.load(trimmed / onnx_export.DECODER_FILE, load_external_data=False).graph.node
    }
    with pytest.raises(ValueError, match="vocab_size"):
        DecoderSession(
            DecoderFacts(
                LAYERS,
                HEADS,
                WIDTH // HEADS,
                onnx_export.CROSS_KV_FILE,
                onnx_export.DECODER_FILE,
                logit_ids_file=onnx_export.LOGIT_IDS_FILE,
            ),
            trimmed,
            max_length=448,
        )
    decoder = _decoder(trimmed, cache_device=cache_device, logit_ids_file=onnx_export.LOGIT_IDS_FILE)
    decoder.start(states.numpy())
    ours = decoder.forward(ids.numpy())
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours[..., kept], reference[..., kept], atol=1e-4)
    others = np.setdiff1d(np.arange(VOCAB), kept)
    assert np.all(ours[..., others] == np.finfo(np.float32).min)
