"""The architecture as the code states it: data ← metrics ← generators ← evaluation/gates ← jobs ← cli, components,
pipelines, serving. Read from the import statements (top-level and inside functions alike); no import cycle;
no family name in a branch outside sonogen/generators/; files that fit in a head."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sonogen", "components", "pipelines", "serving")
# the lowest layer: the data format, and what every layer shares (seeds and images, typed configs, tracking)
LAYERS = [
    ("data", r"sonogen\.(data(\..*)?|sampling|weights|config|tracking)$"),
    ("metrics", r"sonogen\.metrics(\..*)?$"),
    ("generators", r"sonogen\.generators(\..*)?$"),
    ("evaluation", r"sonogen\.(evaluation|gates|gate_report|model_card|registry|export|backends|generate|client|"
                   r"pyfunc_model|crossval|deploy|mask_gates|reader_study)$"),
    ("jobs", r"sonogen\.jobs(\..*)?$"),
    ("entry points", r"(sonogen\.(cli.*|submit|reader_app)|sonogen|components(\..*)?|pipelines(\..*)?|serving(\..*)?)$"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def layer(module: str) -> int:
    for index, (_, pattern) in enumerate(LAYERS):
        if re.match(pattern, module):
            return index
    raise AssertionError(f"{module} is in no layer: add it to tests/test_architecture.py's LAYERS")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


GRAPH = {module: imports(path) - {module} for module, path in MODULES.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
              for module, targets in GRAPH.items() for target in targets
              if layer(target) > layer(module) and not (module == "sonogen" or target.startswith(module + "."))]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    def package_of(module: str) -> str:  # a package importing its own modules (an __init__) is no cycle
        return module

    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        seen[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own modules
            if seen.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " → ".join(map(package_of, cycle)))
            if target not in seen:
                visit(target)
        stack.pop()
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module)


FAMILY_NAMES = re.compile(r"[\"'](dcgan|sinddm|fewddm|ldm|diffultra|lesionpairs)[\"']|generators\.(dcgan|sinddm|latent_diffusion|"
                          r"diffultra|lesion_pairs)\b")


def test_no_family_is_named_in_a_branch_outside_the_generators():
    named = []
    for module, path in MODULES.items():
        if module.startswith("sonogen.generators"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if FAMILY_NAMES.search(code) and re.search(r"\b(if|elif|==|!=| in )\b|import", code):
                named.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not named, "\n".join(named)


def test_files_fit_in_a_head_or_say_why_not():
    long = []
    for path in (REPO / "sonogen").rglob("*.py"):
        lines = path.read_text().splitlines()
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > 400 and "Longer than 400 lines" not in docstring:
            long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    assert not long, "\n".join(long)
