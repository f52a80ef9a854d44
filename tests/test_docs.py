"""Every relative link in README.md and docs/ resolves, and every repository file the docs, scripts and
module docstrings name exists."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = [*sorted((REPO / "slurm").glob("*.sh")), *sorted(p for p in (REPO / ".ci").iterdir() if p.is_file()),
           REPO / "accelerate_config.yaml"]
PYTHON = [REPO / "extract_distributed.py", *sorted((REPO / "pyramid").glob("*.py")),
          *sorted((REPO / "docs").glob("*.py")), *sorted((REPO / "tests").glob("*.py"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
# A path that starts at one of the repository's own top-level folders: slurm/extract.sh, docs/x.md, ...
TOP_FOLDERS = sorted(p.name for p in REPO.iterdir() if p.is_dir() and p.name in
                     {"docs", "pyramid", "slurm", "tests", ".ci"})
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(f) for f in TOP_FOLDERS) + r")/[\w./-]*[\w-])")
# A bare file name of the kinds the repository holds at its root or in those folders: extract_distributed.py
BARE_NAME = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|sh|md|yaml|toml))(?![\w/-])")
MODULE = re.compile(r"python -m (pyramid(?:\.\w+)+)")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' lines in code blocks are not headings
    return {slug(match) for match in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def prose(text):
    """Markdown without its links' targets (checked as links) and without URLs."""
    text = LINK.sub("", text)
    return re.sub(r"https?://\S+", "", text)


def named_paths(text):
    """(name, kind) for every repository path or file name in `text`; patterns with <, *, %, { are skipped."""
    found = [(m, "path") for m in REPO_PATH.findall(text)]
    found += [(m, "name") for m in BARE_NAME.findall(text)]
    found += [(m, "module") for m in MODULE.findall(text)]
    return found


def exists(name, kind):
    if kind == "path":
        return (REPO / name).exists()
    if kind == "module":
        return (REPO / (name.replace(".", "/") + ".py")).exists() or (REPO / name.replace(".", "/")).is_dir()
    # A bare name: the file at the root, or a module, script, page or test named without its folder.
    return any((folder / name).exists() for folder in (REPO, *(REPO / f for f in TOP_FOLDERS)))


def docstrings(path):
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
    return "\n".join(ast.get_docstring(node) or "" for node in nodes)


def test_pages_exist_in_reading_order():
    assert len(PAGES) > 1 and (REPO / "docs" / "slurm.md").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def missing_in(path, text):
    return [f"{path.relative_to(REPO)} names {name} ({kind}), which does not exist"
            for name, kind in named_paths(text) if not exists(name, kind)]


def test_files_named_in_docs_exist():
    missing = [line for page in PAGES for line in missing_in(page, prose(page.read_text()))]
    assert not missing, "\n".join(missing)


def test_files_named_in_scripts_and_docstrings_exist():
    missing = [line for script in SCRIPTS for line in missing_in(script, script.read_text())]
    missing += [line for module in PYTHON for line in missing_in(module, docstrings(module))]
    assert not missing, "\n".join(missing)


def test_the_checker_sees_a_missing_page():
    # The test above can fail: the multinode script's pointer, as it was before docs/slurm.md existed.
    text = "When several independent one-node jobs would do, they are simpler: see docs/nonexistent.md."
    assert named_paths(text) == [("docs/nonexistent.md", "path")]
    assert not exists("docs/nonexistent.md", "path")
    assert slug("Reruns, failures, offline") == "reruns-failures-offline"
    assert slug("Measuring it: `python -m pyramid.bench`") == "measuring-it-python--m-pyramidbench"


def test_the_code_map_names_every_module_once():
    """docs/code-map.md is the one module map (pyramid/__init__.py points to it): a module added or renamed
    without its line there fails here."""
    text = (REPO / "docs" / "code-map.md").read_text()
    named = re.findall(r"^\| `(pyramid/\w+\.py)` \|", text, flags=re.M)
    modules = sorted(f"pyramid/{path.name}" for path in (REPO / "pyramid").glob("*.py") if path.name != "__init__.py")
    assert sorted(named) == modules
    assert "docs/code-map.md" in ast.get_docstring(ast.parse((REPO / "pyramid" / "__init__.py").read_text()))
