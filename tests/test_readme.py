"""The README's example code runs, and the files its commands name exist."""

import re

from _helpers import REPO

README = (REPO / "README.md").read_text()


def test_python_api_example_runs():
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    opt = scope["opt"]
    masks = opt.masks()
    d = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == d // 2


def test_files_named_in_readme_exist():
    folders = "search_spaces|configs|cluster|benchmarks|scripts|examples"
    names = set(re.findall(rf"\b((?:{folders})/[\w.\-/]+\.(?:yaml|py|sh|txt|md))", README))
    assert names
    missing = sorted(n for n in names if not (REPO / n).exists())
    assert not missing, missing
