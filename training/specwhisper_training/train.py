"""``specwhisper-train-draft``: train a decoder-only draft aligned with a main Whisper model, on CPU.

The draft (distil-whisper style) reads the main encoder's output: a few of the main decoder's
layers with their own cross-attention, the main model's token embeddings (a frozen copy) and an
output head over a TRIMMED vocabulary. The head dominates a small decoder's cost (``512 x 51865``
for multilingual Whisper), so it only scores the ids the main model actually says (those it emits
or ranks among its likeliest on the training audio, optionally the most frequent BPE merges, and
every special and timestamp token). Those rows are the main model's own output projection, kept
frozen: the draft learns to reach the main model's final hidden state, which generalises to unheard
audio far better than a head trained on a few hundred windows. The export records which ids the
head's columns are, and the engine places their scores by id. Its cross-attention reads only the
encoder frames of a window's audio and a short margin after them, in training as when served
(``DraftPolicy.frames_after_audio``): a window's silent padding would be most of a draft step.

It learns from the main model itself (:mod:`specwhisper_training.data`): cross-entropy on the
main model's greedy tokens, plus two targets taken from the main model's final hidden state at every
position: its distribution over the head's ids, and the hidden state itself (the draft's head is the
main model's, so reaching that state is what agreeing means; 512 numbers a position teach more than
one token). The checkpoint is a standard one
that ``specwhisper-export --assistant`` takes: ``WhisperForCausalLM`` + the main processor +
``draft_vocab.json``. :func:`evaluate_draft` reports what matters for speculative decoding on
held-out recordings.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import WhisperForCausalLM

from specwhisper_export.cache import cached_dir, checkpoint_identity, input_key
from specwhisper_export.presets import load_whisper, resolve_checkpoint
from specwhisper_export.shipped import SHARED, shipped_draft
from specwhisper_training import data as draft_data
from specwhisper_training.data import DraftData, Target
from specwhisper_training.heap import freed_memory_kept
from specwhisper_training.model import TrimmedDraft, by_window, final_hidden, loss, make_batch
from specwhisper_training.options import DRAFT_PRESETS, DRAFT_RECIPES, DraftTrainingOptions
from specwhisper_training.vocabulary import coverage, draft_vocabulary, prose_lexicon

log = logging.getLogger(__name__)

TRAINING_FILE = "draft_training.json"


def main_hidden_states(main: nn.Module, data: DraftData, targets: Sequence[Target]) -> dict[int, np.ndarray]:
    """Per window, the main model's final hidden state at each position its targets score (in
    :func:`by_window` order), reading all the encoder frames as the main model does when served.
    Computed once before training (float16): recomputed at every step, it doubled the training time."""
    every_id = np.arange(main.config.vocab_size)
    hidden = {}
    with torch.no_grad():
        for window, chosen in tqdm(by_window(targets).items(), desc="main model hidden states", unit="window"):
            batch = make_batch(data, chosen, every_id, data.states.shape[1])
            found = final_hidden(main.model.decoder, batch.input_ids, batch.states, batch.rows, batch.positions)
            hidden[window] = found.numpy().astype(np.float16)
    return hidden


def init_checkpoint(main: str, init: str) -> Path:
    """The checkpoint ``DraftTrainingOptions.init`` names: a recipe's draft for ``main`` (trained now if
    it is not cached), ``"shipped"`` (``main``'s shipped draft), ``"shipped:NAME"`` (the draft called
    NAME that ships routed beside it), or a checkpoint directory."""
    if init in DRAFT_RECIPES:
        return draft_checkpoint(main, DRAFT_RECIPES[init])
    if init == "shipped" or init.startswith("shipped:"):
        path = shipped_draft(main, init.partition(":")[2] or None)
    else:
        path = Path(init)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {init}: {path} is not a draft checkpoint (no config.json)")
    return path


def warm_start(draft: TrimmedDraft, checkpoint: Path) -> None:
    """Load a trained draft's decoder weights into ``draft``, all but the embeddings and the head
    (both the main model's, frozen, and the head is rebuilt over this training's vocabulary)."""
    trained = WhisperForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    theirs = trained.config.decoder_layers
    ours = draft.model.config.decoder_layers
    if theirs != ours or trained.config.d_model != draft.model.config.d_model:
        raise ValueError(
            f"{checkpoint}: a draft of {theirs} layers of width {trained.config.d_model} cannot start one of "
            f"{ours} layers of width {draft.model.config.d_model}"
        )
    state = {name: value for name, value in trained.state_dict().items() if name not in SHARED}
    missing, unexpected = draft.model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(SHARED):
        raise ValueError(f"{checkpoint}: weights {sorted(unexpected)} unexpected, {sorted(missing)} missing")


def _schedule(step: int, options: DraftTrainingOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth of the learning rate."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(options.steps - options.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def balanced_batches(windows: dict[str, list[int]], size: int, rng: random.Random) -> Iterator[list[int]]:
    """Batches of ``size`` windows in which the languages take turns, each going through its own
    windows reshuffled: the few languages with recordings (and more windows) do not crowd out the
    others."""
    order = sorted(windows)
    queues: dict[str, list[int]] = {language: [] for language in order}
    for turn in itertools.count(step=size):
        batch = []
        for language in (order[(turn + i) % len(order)] for i in range(size)):
            if not queues[language]:
                queues[language] = rng.sample(windows[language], len(windows[language]))
            batch.append(queues[language].pop())
        yield batch


def train(
    draft: TrimmedDraft,
    data: DraftData,
    main_hidden: dict[int, np.ndarray],
    options: DraftTrainingOptions,
    targets: Sequence[Target] | None = None,
) -> list[float]:
    """Optimise ``draft`` in place on ``targets`` (default: the training split; ``main_hidden``:
    :func:`main_hidden_states` of the same); returns the loss per step."""
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    to_trimmed = draft.trimmed_index()
    grouped = by_window(data.split("train") if targets is None else targets)
    languages: dict[str, list[int]] = {}
    for window in sorted(grouped):
        languages.setdefault(data.windows[window].language, []).append(window)
    batches = balanced_batches(languages, options.batch_windows, rng)
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _schedule(step, options))
    average: list[torch.Tensor] = []  # the moving average, from warm-up's end on
    draft.train()
    losses = []
    every_frame = data.states.shape[1]
    for step in (bar := tqdm(range(options.steps), desc="training draft", unit="step")):
        chosen = next(batches)
        # Every other step reads all frames: a long recording's full windows are read whole, and a
        # draft that never saw the frames after its training windows' audio was worse there.
        frames_after_audio = options.frames_after_audio if step % 2 == 0 else every_frame
        batch = make_batch(data, [t for w in chosen for t in grouped[w]], to_trimmed, frames_after_audio)
        teacher = torch.from_numpy(np.concatenate([main_hidden[w] for w in chosen]).astype(np.float32))
        value = loss(draft, batch, teacher, options)
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        if average:
            torch._foreach_lerp_(average, [p.detach() for p in parameters], 1 - options.ema_decay)
        elif step >= options.warmup_steps:
            average = [p.detach().clone() for p in parameters]
        losses.append(value.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    if average:
        with torch.no_grad():
            torch._foreach_copy_(parameters, average)
    draft.eval()
    return losses


# Part of a cached draft's key besides its options and the data module: bump it when a change here
# changes what training produces (not for changes to the report, which needs no retraining).
TRAINING_VERSION = 4


def train_draft(main: str, options: DraftTrainingOptions, out: Path) -> dict:
    """Train a draft for ``main`` and save it in ``out``; returns what was recorded in draft_training.json."""
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    with freed_memory_kept():
        data = draft_data.draft_data(options.corpus, main)
        data_seconds = time.perf_counter() - started
        model, processor = load_whisper(main)
        train_targets = data.split("train")
        eot = model.config.eos_token_id
        loops = [draft_data.repetitive(processor.tokenizer, t, eot) for t in train_targets]
        if options.leave_out_loops:
            train_targets = [t for t, loop in zip(train_targets, loops, strict=True) if not loop]
        lexicon = recipe_lexicon(options, processor.tokenizer)
        token_ids = draft_vocabulary(
            train_targets, model.config.vocab_size, eot, options.vocab_rank_floor, options.vocab_teacher_top_k, lexicon
        )
        draft = TrimmedDraft.from_main(model, options.layers, token_ids)
        if options.init is not None:
            warm_start(draft, init_checkpoint(main, options.init))
        main_hidden = main_hidden_states(model, data, train_targets)
        del model
        losses = train(draft, data, main_hidden, options, train_targets)
    draft.save(out, processor)
    record = {
        "main": main,
        "options": asdict(options),
        "vocabulary": len(token_ids),
        "train_windows": len({t.window for t in train_targets}),
        "train_texts": len(train_targets),
        "repetitive_train_texts": sum(loops),  # left out when leave_out_loops
        "heldout_coverage": coverage(data.split("heldout"), token_ids),
        "final_loss": statistics.fmean(losses[-20:]),
        "seconds_data": round(data_seconds, 1),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    (Path(out) / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    return record


def recipe_lexicon(options: DraftTrainingOptions, tokenizer) -> np.ndarray:
    """The ids the vocabulary rule keeps from the corpus's training prose (:func:`prose_lexicon`)."""
    return prose_lexicon(tokenizer, draft_data.training_prose(options.corpus), options.vocab_prose_min_count)


def widen_head(checkpoint: Path, lexicon: np.ndarray, out: Path, processor) -> dict:
    """Write ``checkpoint`` again in ``out`` with its head also covering ``lexicon``, untrained; returns
    its record.

    No training is needed: the head's rows are the main model's output projection, frozen, and the
    draft is trained to reach the main model's final hidden state, so a row added is scored as the
    main model would score it. What it costs (a draft step's head grows) and whether agreement holds
    (an added id may take a position from the right one) is for the held-out report to say.
    """
    draft = TrimmedDraft.load(checkpoint)
    before = draft.token_ids.numpy()
    token_ids = np.union1d(before, lexicon)
    widened = TrimmedDraft(draft.model, token_ids, draft.model.proj_out.weight[torch.as_tensor(token_ids)])
    widened.save(out, processor)
    record = json.loads((Path(checkpoint) / TRAINING_FILE).read_text())
    record.pop("heldout_coverage", None)  # measured over the narrower head
    record["vocabulary"] = len(token_ids)
    record["widened_head"] = {"from": len(before), "lexicon": len(lexicon)}
    (Path(out) / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    return record


def draft_checkpoint(main: str, options: DraftTrainingOptions | None = None) -> Path:
    """The trained draft of ``main`` (a preset in DRAFT_PRESETS, or any main with ``options``),
    trained on first use and cached in ``cache_root()/drafts``."""
    if options is None:
        if main not in DRAFT_PRESETS:
            raise KeyError(f"no draft preset for {main!r}; known: {sorted(DRAFT_PRESETS)}; pass options")
        options = DRAFT_PRESETS[main]
    identity = checkpoint_identity(resolve_checkpoint(main))
    started_from = _started_from(main, options.init)
    key = input_key("draft", identity, asdict(options), started_from, draft_data.code_version(), TRAINING_VERSION)
    return cached_dir("drafts", key, lambda tmp: train_draft(main, options, tmp))


def _started_from(main: str, init: str | None) -> object:
    """What a draft started from, for its cache key: a recipe by its options (so that the key is known
    without training the recipe's draft first), any other checkpoint by its files."""
    if init is None:
        return None
    if init in DRAFT_RECIPES:
        recipe = DRAFT_RECIPES[init]
        return ("recipe", asdict(recipe), _started_from(main, recipe.init))
    return checkpoint_identity(str(init_checkpoint(main, init)))
