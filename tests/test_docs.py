"""The manual holds together: README.md is the front page and docs/ the topic pages. Every relative
link points at a file that exists; every command in a shell block starts with a command the
project provides or documents; every `docs/PAGE.md "Heading"` that code and configs cite names a
page and a heading that exist."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# What a shell block may run: the project's Makefile and entry points through its virtual
# environment or a plain python, the installers the pages document, and the tools they name
# (gcloud and ssh port forwarding on TPU VMs, curl for the web app, rsync to copy a folder).
COMMANDS = {"make", "python", "python3.11", ".venv/bin/python", ".venv/bin/pip", "pip", "curl",
            "gcloud", "ssh", "apt-get", "rsync"}
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r'docs/([\w-]+\.md)[ :]+\\?"?([^"\\)\n]+?)\\?"?[)";,\n]')


def page_id(page: pathlib.Path) -> str:
  return str(page.relative_to(REPO))


def shell_commands(text: str) -> list[str]:
  """The commands of a page's shell blocks: split at newlines, `&&`, `||` and `;` outside quotes,
  continuation lines joined, comments dropped."""
  commands = []
  for block in SHELL_BLOCK.findall(text):
    current, quote, comment = "", None, False
    chars = iter(block.replace("\\\n", " ") + "\n")
    for ch in chars:
      if comment:
        comment = ch != "\n"
        if comment:
          continue
      if quote:
        quote = None if ch == quote else quote
      elif ch in "'\"":
        quote = ch
      elif ch == "#" and (not current or current[-1].isspace()):
        comment = True
        continue
      elif ch in "\n;" or (ch in "&|" and current.endswith(ch)):
        command = current.rstrip("&|").strip()
        if command:
          commands.append(command)
        current = ""
        continue
      current += ch
  return commands


def first_word(command: str) -> str:
  """The program a command runs, past VAR=value assignments."""
  return re.match(r"""^(?:[A-Za-z_]\w*=(?:"[^"]*"|'[^']*'|\S*)\s+)*(\S*)""", command).group(1)


def test_the_readme_is_the_front_page():
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) < 150, "move topics to their page under docs/"
  linked = {m for m in LINK.findall(readme) if m.startswith("docs/")}
  assert linked == {f"docs/{p.name}" for p in PAGES[1:]}, "the README's table links every page"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_at_files(page):
  for target in LINK.findall(page.read_text()):
    if re.match(r"^[a-z]+://", target) or target.startswith("#"):
      continue
    path = (page.parent / target.split("#")[0]).resolve()
    assert path.exists(), f"{page_id(page)} links {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shell_blocks_run_commands_the_project_documents(page):
  commands = shell_commands(page.read_text())
  unknown = [c for c in commands if first_word(c) not in COMMANDS]
  assert not unknown, f"{page_id(page)}: commands that start with no known program: {unknown}"


def test_shell_command_parsing():
  text = ("```bash\nmake demo   # trains\nJAX_PLATFORMS=cpu A=\"1 2\" .venv/bin/python x.py \\\n  --a 1\n"
          "python3.11 -m venv .venv && .venv/bin/pip install -e .\n# a comment\n"
          "python -c 'import a2jax\nprint(1)'\n```\n"
          "```python\nimport a2jax\n```\n")
  commands = shell_commands(text)
  assert [first_word(c) for c in commands] == ["make", ".venv/bin/python", "python3.11",
                                               ".venv/bin/pip", "python"]
  assert "--a 1" in commands[1]


def headings(page: pathlib.Path) -> set[str]:
  text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
  return {h.strip() for h in re.findall(r"^#{1,4} (.+)$", text, re.M)}


def test_citations_of_the_manual_resolve():
  sources = [p for pattern in ("a2jax/**/*.py", "convert_weights/*.py", "*.py", "tests/*.py",
                               "benchmarks/*.py", "configs/*.yaml", "docs/*.md")
             for p in REPO.glob(pattern) if p != pathlib.Path(__file__).resolve()]
  found = 0
  for source in sources:
    for name, heading in CITATION.findall(source.read_text()):
      page = REPO / "docs" / name
      assert page.is_file(), f"{source.relative_to(REPO)} cites docs/{name}, which does not exist"
      heading = heading.strip()
      if heading:
        found += 1
        assert any(h == heading or h.startswith(heading) for h in headings(page)), (
            f"{source.relative_to(REPO)} cites docs/{name} \"{heading}\": no such heading")
  assert found >= 10  # the citations above were seen
