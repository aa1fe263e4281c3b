"""README.md and docs/*.md: every relative link resolves, heading anchors included, and every
`compress` command line in a code block names a real subcommand and only its real options."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SEPARATORS = {";", "&&", "||", "&", "(", ")"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def label(path: Path) -> str:
    return f"docs/{path.name}" if path.parent.name == "docs" else path.name


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, list]]]:
    """The prose lines (number, text) and the fenced blocks (info, [(number, text)])."""
    prose, blocks, fence, block = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, block = match.group(1), []
            blocks.append((match.group(2).lower(), block))
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) \
                and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            block.append((number, line))
        else:
            prose.append((number, line))
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lowercase, punctuation dropped."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeated headings numbered as GitHub does."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in split_markdown(path.read_text(encoding="utf-8"))[0]:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def paragraphs(prose: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Runs of non-blank prose lines, each with the number of its first line."""
    start, lines = 0, []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            start = start or number
            lines.append(line)
        elif lines:
            yield start, "\n".join(lines)
            start, lines = 0, []


def link_failures(files: Iterable[Path]) -> tuple[int, list[str]]:
    """(links checked, one line per relative link whose file or anchor does not exist)."""
    checked, failures = 0, []
    for path in files:
        prose, _ = split_markdown(path.read_text(encoding="utf-8"))
        for number, text in paragraphs(prose):
            text = INLINE_CODE.sub("code", text)
            for match in LINK.finditer(text):
                target = match.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                checked += 1
                where = f"{label(path)}:{number + text[:match.start()].count(chr(10))}"
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                if not dest.exists():
                    failures.append(f"{where}: {target}: no file {file_part}")
                elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                    failures.append(f"{where}: {target}: no heading #{anchor} in {dest.name}")
    return checked, failures


def shell_lines(block: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """The block's lines with continuations (a trailing backslash) joined, comments left out."""
    start, parts = 0, []
    for number, line in block:
        if not parts and (not line.strip() or line.strip().startswith("#")):
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(parts)
        start, parts = 0, []
    if parts:
        yield start, " ".join(parts)


def commands(line: str) -> Iterator[list[str]]:
    """Each simple command of a shell line as words, cut at its first pipe or redirection."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    redirected = False
    for token in lexer:
        if token in SEPARATORS:
            yield words
            words, redirected = [], False
        elif set(token) <= set("();<>|&"):
            redirected = True  # |, >, >>, <, |&: what follows is not the command's
        elif not redirected:
            words.append(token)
    yield words


def cli_options() -> tuple[set[str], dict[str, set[str]]]:
    """The options of the `compress` group and of each of its subcommands, from the app."""
    from cli.app import app

    group = typer.main.get_command(app)

    def options(command) -> set[str]:
        names = {"--help"}
        for param in command.params:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("-"))
        return names

    return options(group), {name: options(cmd) for name, cmd in group.commands.items()}


def command_failures(files: Iterable[Path]) -> tuple[int, list[str]]:
    """(command lines checked, one line per unknown subcommand or option they use)."""
    group_options, subcommands = cli_options()
    checked, failures = 0, []
    for path in files:
        _, blocks = split_markdown(path.read_text(encoding="utf-8"))
        for info, block in blocks:
            if info not in SHELL_BLOCKS:
                continue
            for number, line in shell_lines(block):
                where = f"{label(path)}:{number}"
                try:
                    words_list = list(commands(line))
                except ValueError as error:  # unbalanced quotes
                    if "compress" in line:
                        failures.append(f"{where}: cannot read the shell line ({error})")
                    continue
                for words in words_list:
                    at = [i for i, w in enumerate(words) if w == "compress"
                          or w.endswith("/compress")]
                    if not at:
                        continue
                    rest = words[at[0] + 1:]
                    while rest and rest[0] in group_options:  # `compress --debug prune ...`
                        rest = rest[1:]
                    if not rest:
                        continue
                    checked += 1
                    name, args = rest[0], rest[1:]
                    if name not in subcommands:
                        failures.append(f"{where}: compress {name}: no such subcommand")
                        continue
                    allowed = subcommands[name] | group_options  # --debug also after it
                    for arg in args:
                        if arg == "--":
                            break
                        flag = arg.split("=", 1)[0]
                        if flag.startswith("--") and flag not in allowed:
                            failures.append(f"{where}: compress {name}: no option {flag}")
    return checked, failures


def test_relative_links_and_anchors_exist():
    checked, failures = link_failures(doc_files())
    assert checked > 20, f"only {checked} relative links found: is the parser broken?"
    assert failures == [], "\n" + "\n".join(failures)


def test_documented_commands_use_real_options():
    checked, failures = command_failures(doc_files())
    assert checked > 20, f"only {checked} compress command lines found: is the parser broken?"
    assert failures == [], "\n" + "\n".join(failures)
