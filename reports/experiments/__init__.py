"""Each experiment's report section, one module per experiment, named by the `section` of its
declaration (`study.experiments.registry`): `section(result, records)` renders it. They live here,
not with the experiments, because `reports` sits above `study` in the layers contract."""
