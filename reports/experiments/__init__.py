"""Each experiment's report section, one module per experiment (`study.e1` ... `study.sample_eff`
hold the runs and the table rows): `STAGE` names its stage and `section(result, records)` renders it.
They live here, not with the runs, because `reports` sits above `study` in the layers contract."""
