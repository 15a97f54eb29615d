"""Activation clusters ([P] Figure 3): the attention-block output at the last input position
(the position that predicts y1), for the base model and under each task's method state. Prefixes
move activations into task clusters; separability is measured with and without the method.

Projections to 2-D: PCA (fit on all points) and random Gaussian coordinates, as in [P].
Separability: held-out nearest-centroid accuracy of task identity (chance = 1 / n_tasks) and
the silhouette score. "Without the method" labels the base activations of the same inputs by task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.common import Probe, check_layers_heads, probe_inputs
from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyTransformer


@dataclass
class ClusterResult:
    tasks: list[str]
    layer: int
    position: int
    base: Tensor  # [N, d] base activations
    method: Tensor  # [n_tasks, N, d] activations under each task's method
    pca: Tensor  # [n_tasks + 1, N, 2] (index 0 = base)
    random: Tensor  # [n_tasks + 1, N, 2]
    separability: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"probe": "clusters", "tasks": self.tasks, "layer": self.layer, "position": self.position,
                "n_inputs": int(self.base.shape[0]), **self.separability}

    def tensors(self) -> dict[str, Tensor]:
        return {"clusters.base": self.base, "clusters.method": self.method, "clusters.pca": self.pca,
                "clusters.random": self.random}


def nearest_centroid_accuracy(x: Tensor, labels: Tensor) -> float:
    """Fit centroids on even rows, classify odd rows."""
    train, test = torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)
    classes = labels.unique()
    cents = torch.stack([x[train][labels[train] == c].mean(0) for c in classes])
    pred = classes[torch.cdist(x[test], cents).argmin(1)]
    return float((pred == labels[test]).float().mean())


def silhouette(x: Tensor, labels: Tensor, max_points: int = 1000) -> float:
    """Mean silhouette; on an evenly strided subsample of at most `max_points` points, so that
    time and memory stay bounded (the full distance matrix is quadratic in the inputs)."""
    if len(x) > max_points:
        idx = torch.linspace(0, len(x) - 1, max_points).long()
        x, labels = x[idx], labels[idx]
    d = torch.cdist(x, x)
    classes = labels.unique()
    if len(classes) < 2:
        return 0.0
    a = torch.zeros(len(x))
    b = torch.full((len(x),), float("inf"))
    for c in classes:
        m = labels == c
        mean_to_c = d[:, m].sum(1) / (m.sum() - m.float()).clamp_min(1)  # own class excludes self
        a = torch.where(m, mean_to_c, a)
        b = torch.where(~m, torch.minimum(b, d[:, m].mean(1)), b)
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    return float(s.nan_to_num(0.0).mean())


@torch.no_grad()
def activation_clusters(model: ToyTransformer, states: dict[str, MethodState], tokens: Tensor,
                        position: int, layer: int = 0, seed: int = 0, batch_size: int = 250) -> ClusterResult:
    if not states:
        raise UserError("the clusters probe needs at least one tuned run (a task's method state)")
    check_layers_heads(model, [layer], None)
    name = f"blocks.{layer}.hook_attn_out"
    T = tokens.shape[1]

    def acts(state):  # the position counts from the content's end, whatever the slots hold
        out = []
        for i in range(0, len(tokens), batch_size):
            _, c = model.run_with_cache(tokens[i:i + batch_size], state=state, names_filter=name)
            a = c[name]
            out.append(a[:, a.shape[1] - T + position])
        return torch.cat(out)

    model.eval()
    base = acts(None)
    method = torch.stack([acts(s) for s in states.values()])
    allpts = torch.cat([base.unsqueeze(0), method])  # [k+1, N, d]
    flat = allpts.reshape(-1, allpts.shape[-1])
    mean = flat.mean(0)
    _, _, V = torch.linalg.svd(flat - mean, full_matrices=False)
    pca = (allpts - mean) @ V[:2].T
    g = torch.Generator().manual_seed(seed)
    rand = allpts @ torch.randn(allpts.shape[-1], 2, generator=g)
    k, N = method.shape[:2]
    labels = torch.arange(k).repeat_interleave(N)
    with_m = method.reshape(k * N, -1)
    without = base.repeat(k, 1)
    sep = {"nearest_centroid_acc_with_method": nearest_centroid_accuracy(with_m, labels) if k > 1 else None,
           "nearest_centroid_acc_without_method": nearest_centroid_accuracy(without, labels) if k > 1 else None,
           "silhouette_with_method": silhouette(with_m, labels) if k > 1 else None,
           "silhouette_without_method": silhouette(without, labels) if k > 1 else None,
           "chance": 1.0 / k,
           "mean_shift_norm": {t: float((method[i] - base).norm(dim=-1).mean()) for i, t in enumerate(states)}}
    return ClusterResult(list(states), layer, position, base, method, pca, rand, sep)


def _clusters_of_runs(runs, n_inputs: int, key) -> ClusterResult:
    """The first run's test inputs, under every run's method state ([P] Figure 3)."""
    ref = runs[0]
    return activation_clusters(ref.model, {key(r): r.state for r in runs}, probe_inputs(ref, n_inputs),
                               position=ref.spec.length - 1)


PROBE = Probe("clusters", "activation clusters of the runs' methods at the last input position ([P] Fig. 3)",
              across=_clusters_of_runs)
