"""Per-request statistics: what the draft saved and where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    tokens_out: int = 0
    tokens_drafted: int = 0
    tokens_accepted: int = 0
    tokens_copied: int = 0  # of tokens_drafted, those copied from earlier text (copying), not drafted
    copies_accepted: int = 0  # of tokens_accepted, those copied
    main_passes: int = 0
    assistant_passes: int = 0
    windows: int = 0
    undrafted_rounds: int = 0  # rounds of a speculative request that drafted nothing (its costs said so)
    fallback_decodes: int = 0  # windows decoded again at a higher temperature
    windows_skipped: int = 0  # windows judged silent (no speech): no segments
    temperatures: list[float] = field(default_factory=list)  # each window's final temperature, in order
    rows_in_steps: int = 0  # the batch sizes of the steps it took part in, summed
    seconds_queued: float = 0.0  # from arrival until its first window was decoded
    seconds_to_first_segment: float = 0.0  # from arrival until its first segment was ready
    seconds_vad: float = 0.0
    speech_seconds: float = 0.0  # the speech the VAD found (VAD filter only)
    seconds_features: float = 0.0
    seconds_encoder: float = 0.0
    seconds_draft: float = 0.0
    seconds_verify: float = 0.0

    def add_verify(self, seconds: float) -> None:
        self.main_passes += 1
        self.seconds_verify += seconds

    def add_draft(self, seconds: float) -> None:
        self.assistant_passes += 1
        self.seconds_draft += seconds

    def add_round(self, drafted: int, accepted: int) -> None:
        self.tokens_drafted += drafted
        self.tokens_accepted += accepted

    def add_copied(self, copied: int, accepted: int) -> None:
        self.tokens_copied += copied
        self.copies_accepted += accepted

    def add_tokens(self, count: int) -> None:
        self.tokens_out += count

    @property
    def acceptance_rate(self) -> float:
        return self.tokens_accepted / self.tokens_drafted if self.tokens_drafted else 0.0

    @property
    def tokens_per_main_pass(self) -> float:
        return self.tokens_out / self.main_passes if self.main_passes else 0.0

    @property
    def rows_per_step(self) -> float:
        """The mean batch size of the steps it took part in."""
        return self.rows_in_steps / self.main_passes if self.main_passes else 0.0

    def add(self, other: DecodeStats) -> None:
        """Sum ``other`` into this (several requests' totals)."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_main_pass": round(self.tokens_per_main_pass, 4),
            "rows_per_step": round(self.rows_per_step, 3),
        }
