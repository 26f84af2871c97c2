"""The layering of tidal/: no module imports a layer above its own, and the
engine, cache, runner, layers and kernels know no model by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tidal"
# Top to bottom; a module may import its own layer or any below it.
ORDER = ["cli", "demo", "server", "api", "models", "engine", "cache", "runner", "layers", "kernels", "core", "base"]
BASE = {"errors", "validation", "images", "resample"}  # leaf helpers any layer may use


def _layer(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in BASE:
        return "base"
    return top if top in ORDER else "api"


def _imports(path: Path) -> list[str]:
    """Modules imported at run time (imports under `if TYPE_CHECKING:` are for annotations only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tidal"):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("tidal")]
    return out


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__main__.py" and p.parent != ROOT or p.stem in ("core", "api", "cli", "demo"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it(path):
    rel = path.relative_to(ROOT).with_suffix("")
    module = "tidal." + ".".join(rel.parts)
    mine = ORDER.index(_layer(module))
    for imported in _imports(path):
        theirs = ORDER.index(_layer(imported))
        assert theirs >= mine, f"{module} ({ORDER[mine]}) imports {imported} ({ORDER[theirs]})"


def test_the_engine_side_imports_no_model():
    for layer in ("engine", "cache", "runner", "layers", "kernels"):
        for path in (ROOT / layer).rglob("*.py"):
            assert not any(m.startswith("tidal.models") for m in _imports(path)), path


def test_tidal_runs_where_triton_is_missing(tmp_path):
    """A CPU install has no Triton: tidal imports and answers without it."""
    import subprocess
    import sys

    from conftest import GOLDEN

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import tidal\n"
        f"md = tidal.Moondream.from_pretrained({str(GOLDEN)!r}, device='cpu')\n"
        "print(md.query(None, 'what color is the car', settings={'temperature': 0, 'max_tokens': 16})['answer'])\n"
        "md.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "w44836 w44836"  # the fixture's text-only answer
