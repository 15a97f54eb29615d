"""The probe registry: every probe `prefixlab probe` and the report run, by name. A new probe is
its own file ending in a `PROBE = Probe(...)` declaration (probes/common.py) plus one line here."""

from __future__ import annotations

from probes import bias, clusters, drift, invariance
from probes.common import Probe

PROBES: dict[str, Probe] = {p.PROBE.name: p.PROBE for p in (invariance, bias, clusters, drift)}
