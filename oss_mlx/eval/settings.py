"""What one evaluation run is: the settings that change a score, and the sampling they mean."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, field

# How the runner turns a case into requests (see runner.py): bump it when that changes, so
# --resume never mixes results made two different ways.
PROTOCOL = 1


@dataclass
class Settings:
    """model: a store name or folder, as given. temperature 0 is greedy: BFCL generates at
    0.001 for every model on its leaderboard, which is greedy in all but name; greedy also makes
    a run repeatable. max_tokens: per model turn, reasoning included (a turn cut there is a
    miss). date: the system message's date line, fixed for the whole run (a resumed run keeps
    the date it started with). extra: other options that change the model's output
    (--kv-bits, --max-context, ...), recorded as given."""

    model: str
    reasoning: str = "medium"
    constrain: bool = True
    temperature: float = 0.0
    max_tokens: int = 4096
    seed: int = 0
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    extra: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """Everything that makes two runs comparable (the date is not: a resumed run
        continues across midnight)."""
        out = asdict(self)
        out.pop("date")
        out["protocol"] = PROTOCOL
        return out

    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        """A short name for tables and plots: what differs between settings users compare."""
        name = self.model.rstrip("/").split("/")[-1]
        parts = [name, f"reasoning {self.reasoning}",
                 "constrained" if self.constrain else "unconstrained"]
        if self.temperature:
            parts.append(f"T={self.temperature:g}")
        parts += [f"{k}={v}" for k, v in sorted(self.extra.items()) if v is not None]
        return ", ".join(parts)

    def sampling(self, processors: list):
        from oss_mlx.engine import SamplingParams

        return SamplingParams(temperature=self.temperature, seed=self.seed,
                              max_tokens=self.max_tokens, logits_processors=processors)
