"""Code says why; docs say how much.

The product's text (comments, docstrings and string literals such as tooltips, under ``syncdiff_core/`` and
``nodes/``) states intent and units. It carries no date, no GPU card, no commit id, no issue number and no reference
to a file outside the repository: those belong to the measurement record (``docs/dev/``, ``bench/results/``).
The user documentation (README.md and ``docs/``) links only to files that exist.

Pure Python: no ComfyUI and no torch needed.
"""
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("syncdiff_core", "nodes")

DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
CARD = re.compile(r"\b(?:[AH]100|H200|H20|B200|GB200|A10G?|A40|V100|P100|L4|L40S?|MI[123]\d\dX?|"
                  r"(?:RTX|GTX)[ -]?(?:A?\d{3,4}|TITAN)|[1-5]0[5-9]0(?: ?Ti)?)\b")
ISSUE = re.compile(r"\bissues?\s+#?\d+\b|(?<![\w&/#])#\d+\b", re.IGNORECASE)
OUTSIDE = re.compile(r"\bDESIGN\b|/work/|(?<![\w/])~/notes\b")
# a commit id: 7-40 lowercase hex characters with at least one digit and one letter, standing alone as a word
# (not part of a file name such as ``vgg16-397923af.pth``, a hex literal ``0x...`` or an identifier), or any hex
# word right after "commit"
HEX = re.compile(r"(?<![\w.\-/])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w\-/]|\.\w)")
COMMIT = re.compile(r"\bcommits?\s+[0-9a-f]{7,40}\b", re.IGNORECASE)
# one run's figure stated as a property: "23 % faster", "3.4x slower", "took 9.5 ms", "measured on ..."
RUN_FIGURE = re.compile(r"\d+(?:\.\d+)?\s?(?:%|x)\s+(?:faster|slower|quicker)\b|\btook\s+(?:about\s+)?\d|"
                        r"\bmeasured\s+on\s+(?:an?\s+)?[A-Z]", re.IGNORECASE)


def product_files() -> list[Path]:
    files = []
    for d in PRODUCT_DIRS:
        files.extend(sorted((ROOT / d).rglob("*.py")))
    return files


def text_tokens(source: str):
    """(line, kind, text) of every comment and string literal; ``kind`` is "comment", "docstring" or "string".
    A docstring here is a string that is a statement of its own (the first statement of a module, class or
    function, or an attribute's string after it); every other string is an ordinary literal."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    significant = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT,
                   tokenize.ENCODING}
    prev = None  # the last significant token before this one
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], "comment", tok.string
            continue
        if tok.type == tokenize.STRING:
            nxt = next((t for t in tokens[i + 1:] if t.type not in (tokenize.NL, tokenize.COMMENT)), None)
            alone = (prev is None or prev.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)) and \
                (nxt is None or nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.DEDENT))
            yield tok.start[0], "docstring" if alone else "string", tok.string
        elif getattr(tokenize, "FSTRING_START", None) is not None and tok.type == tokenize.FSTRING_MIDDLE:
            yield tok.start[0], "string", tok.string
        if tok.type not in significant:
            prev = tok
        elif tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            prev = tok


def findings_in(text: str, kind: str) -> list[str]:
    found = []
    for name, pattern in (("date", DATE), ("card", CARD), ("issue", ISSUE), ("outside file", OUTSIDE),
                          ("commit", COMMIT), ("run figure", RUN_FIGURE)):
        found += [f"{name} {m.group(0)!r}" for m in pattern.finditer(text)]
    # hex words in prose only: comments, docstrings and strings that read as sentences (a hash constant is
    # data, not a claim about a run)
    if kind != "string" or " " in text.strip():
        found += [f"commit-like id {m.group(0)!r}" for m in HEX.finditer(text)
                  if not COMMIT.search(text[max(0, m.start() - 8):m.end()])]
    return found


def offending_lines(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    out = []
    for line, kind, text in text_tokens(path.read_text(encoding="utf-8")):
        for k, piece in enumerate(text.splitlines() or [text]):
            for f in findings_in(piece, kind):
                out.append(f"{rel}:{line + k}: {f}: {piece.strip()[:120]}")
    return out


def test_the_scanner_finds_what_it_looks_for():
    bad = '''"""Measured on an H100 on 2026-12-07 at commit 6718750 (issue 16), see DESIGN §1."""
X = 1  # fa58ee0 made this faster on an RTX 4090; #12
TIP = "about two minutes on an H200, later runs 23 % faster"
'''
    found = [f for line, kind, text in text_tokens(bad) for f in findings_in(text, kind)]
    kinds = sorted({f.split(" ", 1)[0] for f in found})
    assert kinds == ["card", "commit", "commit-like", "date", "issue", "outside", "run"], found
    assert any("H200" in f for f in found) and any("'#12'" in f for f in found)
    assert any("fa58ee0" in f for f in found) and any("RTX 4090" in f for f in found)
    assert any("23 % faster" in f for f in found) and any("Measured on an H" in f for f in found)


def test_the_scanner_leaves_units_names_and_constants_alone():
    good = '''"""Windows of 512 px, 1024x1024 latents, 2**20 elements, 3 GiB a window; torchvision's vgg16-397923af.pth.
The first run at a new size compiles and can take minutes; later runs are faster. A 2x larger window."""
MASK = 0xFFFF_FFFF  # a hex literal, not a commit
URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
SHA = "9a8b7c6d5e4f3a2b1c0d"
NAME = f"prefix_{7:05}_.png"
'''
    found = [f for line, kind, text in text_tokens(good) for f in findings_in(text, kind)]
    assert found == []


def test_product_text_has_no_dates_cards_commits_issues_or_outside_files():
    offenders = [line for path in product_files() for line in offending_lines(path)]
    assert not offenders, ("product comments, docstrings and tooltips must state intent and units; move these "
                           "to docs/dev/ or bench/results/:\n" + "\n".join(offenders))


# --- the documentation's links ---------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(path: Path) -> list[tuple[int, str]]:
    links, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # a URL, a mail address or an anchor in the same page
            links.append((n, target))
    return links


def test_the_link_reader_finds_relative_links_only():
    text = "[a](dev/method.md) [b](https://x.org/y.md) [c](#top) ![d](pic.png)\n```\n[e](nowhere.md)\n```\n"
    got = []
    for n, line in enumerate(text.splitlines(), 1):
        got += [m.group(1) or m.group(2) for m in LINK.finditer(line)]
    assert got == ["dev/method.md", "https://x.org/y.md", "#top", "pic.png", "nowhere.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_in_the_docs_resolves(path):
    broken = []
    for n, target in relative_links(path):
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        if not (path.parent / file_part).exists():
            broken.append(f"{path.relative_to(ROOT).as_posix()}:{n}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_docs_exist_where_the_readme_points():
    """README links the user pages and the developer pages; each developer page is linked from somewhere."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("docs/PERFORMANCE.md", "docs/FAMILIES.md", "docs/RELIABILITY.md", "docs/dev/method.md",
                 "docs/dev/architecture.md"):
        assert f"]({page})" in readme, page
    linked = {(p.parent / t.split("#", 1)[0]).resolve() for p in doc_files() for _, t in relative_links(p)}
    for dev_page in sorted((ROOT / "docs" / "dev").glob("*.md")):
        assert dev_page.resolve() in linked, f"{dev_page.relative_to(ROOT)} is linked from no page"
