"""The README stays true: its example runs, its test command is the one CI runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_plain_pytorch_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section("ROSE in plain PyTorch"), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 3: loss" in out.stdout and "16 eligible tensors" in out.stdout


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(.*?)\n```", _section("Install and test"), re.S).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci
