"""The study's catalogue loads without torch, transformers or Ray (study/stages.py: the stage
functions import their experiments when they run), so `reproduce` plans and refuses bad input fast."""

import subprocess
import sys


def test_the_stage_catalogue_imports_no_heavy_package():
    code = ("import sys; from pathlib import Path; from study.stages import stages_for; "
            "st = stages_for('quick', Path('/tmp/x')); assert st; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
