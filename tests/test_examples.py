"""Every example in examples/ runs to completion (they check their own results)."""

import os
import sys

import pytest

from conftest import ROOT, run_python

EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def test_there_are_examples():
    assert "quickstart.py" in EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    path = os.path.join(ROOT, "examples", name)
    proc = run_python(f"import runpy, sys; sys.argv = [{path!r}]; "
                      f"runpy.run_path({path!r}, run_name='__main__')", timeout=600)
    assert proc.stdout.strip(), f"{name} printed nothing"
