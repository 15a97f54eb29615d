"""Beyond [P]: Prefix-Tuning+ ([PT+], `--method prefix_plus`, docs/papers.md §7) on the tasks where
prefixes fail. [PT+] leaves every attention pattern the base model's, as a prefix does, but adds a
bias φ(q)ᵀM whose direction moves with the query, where a one-slot prefix's has one direction per
head. So its rows ask which is [P]'s limit: "cannot change attention" or "one bias direction".

One experiment per toy base (`e1` … `e4`: each reuses E1 … E4's base and recipe, so no base is
pretrained for them) and a probe stage on the study's LLaMA-family model (`probes`: invariance and
dilution); each module ends in its declaration, as every experiment's does, and `EXPERIMENTS`
lists them for the registry (`study.experiments.registry`). What they share is in `common`.
"""

from __future__ import annotations

from study.experiments.prefix_plus import e1, e2, e3, e4, probes

EXPERIMENTS = (e1.EXPERIMENT, e2.EXPERIMENT, e3.EXPERIMENT, e4.EXPERIMENT, probes.EXPERIMENT)
