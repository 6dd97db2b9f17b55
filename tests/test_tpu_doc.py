"""docs/tpu-vm.md stays true to the CLI: every `gemma-jax ...` command in its fenced code blocks
parses with the parser the console script builds (`serving.cli:main`), and every `pip install`
names only this package or jax extras."""

import pathlib
import re
import shlex
import tomllib

import pytest

from gemma_jax import cli as core_cli
from serving import cli as serve_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "tpu-vm.md"


def _shell_commands(markdown: str) -> list[list[str]]:
    """Each shell command of the fenced blocks as argv (continuations joined, comments dropped);
    a `gemma-jax` or `pip` command inside a quoted argument (ssh --command '... && gemma-jax ...')
    or after `&&` counts as a command of its own."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            pending = [line]
            while pending:
                words = shlex.split(pending.pop(), comments=True)
                current: list[str] = []
                for word in [*words, "&&"]:
                    if word in ("&&", "||", ";", "|"):
                        if current:
                            commands.append(current)
                        current = []
                    elif current and (" gemma-jax " in f" {word}" or "pip install" in word):
                        pending.append(word)  # a command quoted inside this one
                        current.append(word)
                    else:
                        current.append(word)
    return commands


def _gemma_jax_commands() -> list[list[str]]:
    return [cmd[1:] for cmd in _shell_commands(DOC.read_text()) if cmd[0] == "gemma-jax"]


def test_the_doc_has_the_commands_it_promises():
    commands = _gemma_jax_commands()
    subcommands = {cmd[0] for cmd in commands}
    assert {"serve", "convert", "generate"} <= subcommands
    assert {tuple(cmd[cmd.index("--from") + 1:cmd.index("--from") + 2]) for cmd in commands if cmd[0] == "convert"} \
        == {("kaggle",), ("hf",)}
    # the multi-host command, quoted inside gcloud's --command, is found too
    assert any("data=1,model=16" in cmd for cmd in commands)


@pytest.mark.parametrize("argv", _gemma_jax_commands(), ids=lambda argv: " ".join(argv)[:80])
def test_every_gemma_jax_command_parses(argv):
    parser = core_cli.build_parser((*core_cli.COMMANDS, serve_cli._add_serve))  # what serving.cli:main builds
    args = parser.parse_args(argv)
    assert args.command == argv[0]
    if "--mesh" in argv:
        data, model = args.mesh
        assert argv[argv.index("--mesh") + 1] == f"data={data},model={model}"


def test_every_pip_install_names_our_package_or_jax_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = {project["name"], "."}
    dependency_names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert "jax" in dependency_names
    jax_extras = {"tpu", "cuda12", "cuda13", "cpu"}  # extras of the jax distribution on PyPI
    installs = [cmd for cmd in _shell_commands(DOC.read_text()) if cmd[:2] == ["pip", "install"]]
    assert installs
    named = []
    for cmd in installs:
        for word in cmd[2:]:
            if word.startswith("-"):
                continue
            named.append(word)
            match = re.fullmatch(r"jax\[([a-z0-9_,]+)\]", word)
            assert word in ours or (match and set(match.group(1).split(",")) <= jax_extras), word
    assert "jax[tpu]" in named and "." in named
