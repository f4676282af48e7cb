"""Per-request statistics: what the draft saved and where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DecodeStats:
    tokens_out: int = 0
    tokens_drafted: int = 0
    tokens_accepted: int = 0
    main_passes: int = 0
    assistant_passes: int = 0
    windows: int = 0
    fallback_windows: int = 0  # windows finished without drafting because drafting stopped paying
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

    def add_tokens(self, count: int) -> None:
        self.tokens_out += count

    @property
    def acceptance_rate(self) -> float:
        return self.tokens_accepted / self.tokens_drafted if self.tokens_drafted else 0.0

    @property
    def tokens_per_main_pass(self) -> float:
        return self.tokens_out / self.main_passes if self.main_passes else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_main_pass": round(self.tokens_per_main_pass, 4),
        }
