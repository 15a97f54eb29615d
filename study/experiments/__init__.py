"""The study's experiments, one module each, every one ending in its declaration (`declaration`),
listed in `registry`: [P]'s E1-E4 and identity probes, the LLaMA check, Theorems 1 and 2, and
[L]'s three: the toy (`sample_eff`), the simulation (`reparam`) and the language experiment
(`language`, trained by `data_to_text` on `d2t_data`). What the toy experiments share is `toy`."""
