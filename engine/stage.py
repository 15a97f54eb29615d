"""A stage: one cached unit of a study (an experiment, a base model, a probe, a check).

Its key hashes its name, its config and its upstream stages' keys, so a stage is recomputed
exactly when what it reads changes (out/stages/<name>-<key>/).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable


@dataclass
class Stage:
    name: str
    title: str
    config: dict
    fn: Callable[..., dict]  # (dir, config, upstream results, progress, device=None) -> result
    needs: tuple[str, ...] = ()
    estimate: float = 1.0  # seconds at one thread, roughly (the schedule's guess before a measurement)

    def key(self, upstream_keys: dict[str, str]) -> str:
        blob = json.dumps({"name": self.name, "config": self.config,
                           "needs": {n: upstream_keys[n] for n in self.needs}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
