"""study/stages.py loads without torch, transformers or Ray (its stage functions import their
experiments when they run), and planning the quick study never imports the LLaMA checks."""

import subprocess
import sys


def test_the_stage_catalogue_imports_no_heavy_package():
    code = ("import sys; import study.stages; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_planning_the_study_does_not_import_the_model_checks():
    code = ("import sys; from pathlib import Path; from study.stages import stages_for; "
            "assert stages_for('quick', Path('/tmp/x')); "
            "print(sorted(m for m in sys.modules if m.startswith(('model_checks', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
