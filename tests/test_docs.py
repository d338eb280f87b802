"""Every relative link and ``../`` path in the repository's Markdown files points
at a file inside the repository (the design notes live in docs/, not beside it)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Not the repository's own documents: environments, caches, run outputs.
SKIP_DIRS = {"runs", "build", "dist", "__pycache__"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
# A path that climbs out of the file's folder, written as a link or not
# (e.g. "see `../notes/DESIGN.md`").
CLIMB = re.compile(r"(?<![\w./-])((?:\.\./)+[\w./-]*\w)")


def _markdown_files(root: pathlib.Path):
  for path in sorted(root.rglob("*.md")):
    parts = path.relative_to(root).parts[:-1]
    if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info")
           for p in parts):
      continue
    yield path


def problems(path: pathlib.Path, root: pathlib.Path) -> list[str]:
  """What in ``path`` points outside ``root`` or at nothing."""
  text = path.read_text()
  found = []
  targets = LINK.findall(text) + REFERENCE.findall(text)
  for target in targets:
    if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
      continue  # a URL (https:, mailto:) or an anchor in the same file
    file_part = target.split("#", 1)[0]
    if file_part.startswith("/"):
      found.append(f"link {target}: an absolute path")
      continue
    resolved = (path.parent / file_part).resolve()
    if not resolved.is_relative_to(root):
      found.append(f"link {target}: outside the repository")
    elif not resolved.exists():
      found.append(f"link {target}: no such file")
  for climb in CLIMB.findall(text):
    if not (path.parent / climb).resolve().is_relative_to(root):
      found.append(f"path {climb}: outside the repository")
  return found


@pytest.mark.parametrize("path", list(_markdown_files(ROOT)),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(path):
  found = problems(path, ROOT)
  assert not found, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(found)


def test_the_design_notes_are_in_the_repository():
  readme = (ROOT / "README.md").read_text()
  for doc in ("docs/design.md", "docs/style.md"):
    assert (ROOT / doc).is_file()
    assert f"]({doc})" in readme, f"README.md does not link {doc}"


def test_checker_catches_links_out_and_dangling_links(tmp_path):
  """The rule above could fail: each kind of bad reference is reported."""
  repo = tmp_path / "repo"
  (repo / "docs").mkdir(parents=True)
  (repo / "docs" / "design.md").write_text("# design\n")
  readme = repo / "README.md"
  readme.write_text(
      "Good: [design](docs/design.md#op), [site](https://example.org), [top](#a).\n"
      "Design notes: `../shared/DESIGN.md` (architecture).\n"
      "[gone](docs/missing.md) ![fig](/abs/fig.png)\n"
      "[ref]: ../outside.md\n")
  assert problems(readme, repo) == [
      "link docs/missing.md: no such file",
      "link /abs/fig.png: an absolute path",
      "link ../outside.md: outside the repository",
      "path ../shared/DESIGN.md: outside the repository",
      "path ../outside.md: outside the repository",
  ]
