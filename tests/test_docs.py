"""Docs stay connected: every `docs/<page>.md#anchor` named in code, tests or docs is a heading of
that page (comments point there instead of restating upstream's rules), and every relative link
in README.md and docs/*.md points at a file of the repository (and a heading, when it names one)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("nanochat_jax", "train", "serve", "bench", "tests", "runs", "docs")
ANCHOR_REF = re.compile(r"(?:docs/)?\b([a-z_]+\.md)#([a-z0-9-]+)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def files():
    yield ROOT / "README.md"
    for top in SOURCES:
        for path in (ROOT / top).rglob("*"):
            if path.suffix in (".py", ".md", ".sh") and ".venv" not in path.parts:
                yield path


def test_every_docs_anchor_reference_is_a_heading():
    refs = {(path.relative_to(ROOT), page, anchor)
            for path in files() for page, anchor in ANCHOR_REF.findall(path.read_text(errors="replace"))
            if (ROOT / "docs" / page).is_file()}
    assert refs, "no docs/<page>.md#anchor references found: the pattern is broken"
    bad = [f"{src}: docs/{page}#{anchor}" for src, page, anchor in sorted(refs)
           if anchor not in anchors(ROOT / "docs" / page)]
    assert not bad, "references to headings that do not exist:\n" + "\n".join(bad)


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for page in pages:
        for target in MD_LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # URLs and same-page anchors
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve()
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_slug_follows_github():
    assert slug("How it is tested on CPU") == "how-it-is-tested-on-cpu"
    assert slug("QK norm") == "qk-norm"
    assert slug("Sharding: one mesh, logical axes, many hosts") == "sharding-one-mesh-logical-axes-many-hosts"


def test_no_references_to_documents_outside_the_repository():
    """Comments say their reason in place or point into docs/; a reader of this repository has no
    other design documents, so citations of them (or paths out of the checkout) are dead ends."""
    # The forms such citations took (outside documents, paths out of the checkout); this file alone may name them.
    cited = re.compile(r"spec §|jax-anchors|\.\./shared/|/work/shared")
    bad = [f"{path.relative_to(ROOT)}:{n}" for path in files() if path.name != "test_docs.py"
           for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if cited.search(line)]
    bad += [f"{p.relative_to(ROOT)}" for p in (ROOT / "pyproject.toml", ROOT / ".ci" / "run")
            if cited.search(p.read_text())]
    assert not bad, "references to documents outside the repository:\n" + "\n".join(bad)
