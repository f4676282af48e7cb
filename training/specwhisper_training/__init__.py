"""Train a draft for a main Whisper model: speech corpora, targets from the main model, training, held-out report."""
