"""Planning the study (the stage catalogue, its keys) imports no Ray and none of the LLaMA checks:
the stages that need them import them when they run."""

import subprocess
import sys


def test_planning_the_study_imports_no_ray_and_no_model_checks():
    code = ("import sys; from pathlib import Path; from study.reproduce import plan; "
            "assert plan(Path('/tmp/x'), 'paper', None)[1]; "
            "print(sorted(m for m in sys.modules if m.startswith(('model_checks', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
