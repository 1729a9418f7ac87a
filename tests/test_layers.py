"""The import graph between the top-level folders, drawn from the code (every import, inside functions too):
each folder imports only from the layers below it, so no arrow points up and there is no cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bottom to top; a folder may import from any folder of a lower layer, none of its own layer or above
LAYERS = [
    ["common"],
    ["handlers"],  # packed into the .mar: it imports nothing of the bundle's
    ["training", "servers"],
    ["loadtest", "monitoring"],
    ["bench", "cloud"],
    ["experiments"],  # the hyperparameter search and the serving profile: above everything they drive
    ["scripts"],
]
LEVEL = {folder: level for level, folders in enumerate(LAYERS) for folder in folders}


def imported(path: Path) -> set[str]:
    """The top-level folders of the bundle that a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names} & set(LEVEL)


def test_every_folder_imports_only_from_the_layers_below():
    upward = [
        f"{path.relative_to(ROOT)} imports {target}"
        for folder in LEVEL
        for path in sorted((ROOT / folder).rglob("*.py"))
        for target in imported(path)
        if target != folder and LEVEL[target] >= LEVEL[folder]
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from experiments.tune import tune\n    import training.data\n")
    assert imported(source) == {"experiments", "training"}
