"""The README's "Use from Python" snippet runs as written."""
import os
import re

import pytest

from helpers import ROOT


def readme_snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_use_from_python_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = readme_snippet()
    assert "rank_model" in code and "run_search" in code and "save_model_file" in code
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert os.path.exists(tmp_path / "small.pth")
    res = namespace["result"]
    assert len(res["history"]) == 8
    sampler = namespace["sampler"]
    assert sampler.is_feasible(res["best_x"][None])[0]  # the saved model meets the budget
    macs = namespace["flops"].model_macs(namespace["loaded"])["macs"] / 1e9
    assert abs(macs - namespace["target"]) <= 0.02 * namespace["target"] + 1e-12
    assert "GMACs, val top-1" in capsys.readouterr().out
