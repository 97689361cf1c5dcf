"""Every example in examples/ runs to completion (they check their own results),
and writes nothing into the user's home: each runs with HOME set to an empty
folder that must stay empty (its caches and traces go to the test session's
folder, tests/conftest.py)."""

import os

import pytest

from conftest import ROOT, run_python

EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def test_there_are_examples():
    assert "quickstart.py" in EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    path = os.path.join(ROOT, "examples", name)
    home = tmp_path / "home"
    home.mkdir()
    proc = run_python(f"import runpy, sys; sys.argv = [{path!r}]; "
                      f"runpy.run_path({path!r}, run_name='__main__')", timeout=600,
                      env={"HOME": str(home)})
    assert proc.stdout.strip(), f"{name} printed nothing"
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert not written, f"{name} wrote into $HOME: {written}"
