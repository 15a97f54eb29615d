"""What every package of prefixlab shares, at the bottom of the layers (pyproject.toml's
import-linter contract): the user-error type (`errors`), the progress callback type (`progress`),
strict JSON of measured numbers (`jsonsafe`) and the attention-identity maths that the toy probes
and the LLaMA checks both use (`attention`). It imports nothing of the project."""
