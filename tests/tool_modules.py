"""Import a ``tools/`` script as a module (the scripts are not a package)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """The module of ``tools/<name>.py``, under the name ``maskattn_tool_<name>``."""
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"maskattn_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
