"""Sphinx configuration: the API reference from pgpool's docstrings, the guides from README.md.

Built by ``make docs`` (warnings are errors) into docs/_build/html.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout, even where the installed copy differs

import pgpool  # noqa: E402

project = "pgpool"
author = "the pgpool authors"
copyright = "2026, the pgpool authors"
release = pgpool.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",  # Markdown: README.md and CHANGELOG.md are included as they are
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
# `name` in a docstring is a cross-reference when Sphinx knows the name, code otherwise.
default_role = "py:obj"

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # README's in-page links (#commit-and-rollback-rules) work

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}  # bases shown where they help (errors), not private parts

REPOSITORY = "https://github.com/pgpool-dev/pgpool"
# A Markdown link (not an image) to a path, not to a URL or an anchor: README links files of the
# repository (tests, benchmark results), which are not pages of this site.
_FILE_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s]+)\)")


def _link_repository_files(app: object, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    """In the included README and CHANGELOG, links to repository files go to the repository."""
    if Path(relative_path).name in ("README.md", "CHANGELOG.md"):
        content[0] = _FILE_LINK.sub(lambda m: f"[{m[1]}]({REPOSITORY}/blob/main/{m[2]})", content[0])


def setup(app: object) -> None:
    app.connect("include-read", _link_repository_files)  # type: ignore[attr-defined]


html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["wrap.css"]  # code blocks wrap rather than cut long lines (README's comments)
html_title = f"pgpool {release}"
html_theme_options = {
    "description": "A connection pool for psycopg2 that cannot leak",
    "github_user": "pgpool-dev",
    "github_repo": "pgpool",
}
