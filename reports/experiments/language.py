"""[L]'s language experiment's report section: each share's test loss against n, and the base prefix's."""

from __future__ import annotations

from reports.html import Table


def section(r: dict, records: dict) -> tuple:
    rows = [[share, n, f"{c['lr']:g}", f"{c['test_loss_mean']:.3f}",
             "—" if c["test_loss_std"] is None else f"{c['test_loss_std']:.3f}", f"{c['n_params']:,}"]
            for share, per_n in r["results"].items() for n, c in per_n.items()]
    cfg = r["config"]
    return ("[L]'s language experiment: prefix parameterizations on data-to-text", [
        Table(["share", "training examples n", "lr (chosen on validation)", "test NLL/token", "std over seeds",
               "trainable parameters"], rows)],
        f"{r['model']}, P={cfg['prefix_len']}, {cfg['steps']} steps, {len(cfg['seeds'])} seed(s); the start prefix "
        f"(step 0 of every share) scores {r['base']['test_loss']:.3f} on the test set. docs/llama.md describes the task.")
