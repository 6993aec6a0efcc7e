"""README.md runs as written: its Python examples, its `llama-adapter` commands, and its parts are in sync.

Newcomers copy from the README first, so a snippet that cannot run (a placeholder path, an undefined variable, an
adapter never added) is the first thing they hit (issue 13). The README is read as a walkthrough, top to bottom,
in a temporary directory laid out like a checkout (`recipes/` and `benchmarks/` linked in, `../shared` beside it
when the real checkout has one), so later blocks find the files earlier commands wrote (`runs/demo`,
`runs/builtin-adapter`, ...):

- every ```python block is executed, each in a namespace of its own;
- every command of a ```bash block is classified by `plan()`: `llama-adapter ...` (also `python -m llama_adapter`
  and `torchrun ... -m llama_adapter ...`) is parsed by the real parser (`[...]` marks optional flags), then run
  in-process unless it names something the reader must supply (`PLACEHOLDERS`: their checkpoint `DIR`, their copy
  of the 52K `alpaca_data.json`, ...), is interactive (`chat`) or needs several processes (`torchrun`); slow ones
  run with a cap appended (`CAPS`: `finetune --max-steps 2`, `demo --steps 2`, a smaller multi-modal demo).
  `pip install` and `python -m pytest` are not run here: `.ci/run` runs those two lines as written on a fresh
  clone. Other benchmarks take minutes and only have to exist; `curl` is covered by the Python client example.
  A command no rule knows fails the test: add a rule rather than let it go unchecked.
- `<!-- readme-test: ... -->` on the line before a block changes that: `skip: REASON` (Python compiled only,
  commands only parsed), `background` (the command is started and kept running: the server the client examples
  talk to), `needs-server` (run only if that server came up).

`python tests/test_readme.py --write` rebuilds README.md's `<!-- PARTS -->` section from docs/parts/*.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PARTS = ["builtin", "finetune", "inference", "quantize", "multimodal", "encoders"]  # docs/parts/*.md, in README order
SHARED = ROOT.parent / "shared"  # the data folder beside a checkout (CI puts it there)

# What the reader supplies, and why the test cannot: a command naming one of these is only parsed.
PLACEHOLDERS = {
    "DIR": "your checkpoint directory",
    "CLIP_DIR": "your CLIP vision checkpoint",
    "KEY": "your API key",
    "alpaca_data.json": "your copy of the 52K Alpaca set (not in ../shared/data)",
    "ScienceQA/data/scienceqa": "your copy of the official ScienceQA data (problems.json is not in ../shared/data)",
    "data.json": "your data",
    "train.jsonl": "your multi-modal data",
    "alpaca.safetensors": "your adapter",
    "math.safetensors": "your adapter",
    "mm.safetensors": "your multi-modal adapter",
    "cat.png": "your picture",
    "chat.jsonl": "your conversations",
    "model.gguf": "your GGUF file",
}
CAPS = {  # appended to slow commands: the command runs as written, only shorter
    "finetune": ["--max-steps", "2"],
    "demo": ["--steps", "2"],
    "encoder pretrain": ["--steps", "20"],
    "encoder finetune": ["--epochs", "1"],
    "benchmarks/multimodal_demo.py": ["--n-train", "16", "--n-test", "4", "--epochs", "1", "--threads", "1"],
}
RUNNABLE_BENCHMARKS = {"benchmarks/multimodal_demo.py"}
SERVER_PORT = 8000  # the README's examples talk to the server's default address


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence in README.md
    mark: str = ""  # the `<!-- readme-test: ... -->` mark before it, if any


@dataclass
class Command:
    argv: list[str]  # shell words, optional-flag brackets removed
    text: str
    line: int
    action: str  # "run", "parse", "background", "skip"
    reason: str = ""
    cli: list[str] = field(default_factory=list)  # the llama-adapter arguments, when it is one


def blocks(text: str) -> list[Block]:
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        prev = lines[i - 1] if i else ""
        mark = re.match(r"^<!--\s*readme-test:\s*(.*?)\s*-->", prev)
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : j]) + "\n", i + 1, mark.group(1) if mark else ""))
        i = j + 1
    return out


def commands(block: Block) -> Iterator[tuple[list[str], str, int]]:
    """(shell words, text, line) of each command of a bash block: continuation lines joined, `&&` split."""
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.endswith("\\"):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        words = shlex.split(text, comments=True)
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w == "&&":
                if cmd:
                    yield cmd, " ".join(cmd), block.line + 1 + start
                cmd = []
            else:
                cmd.append(w)


def _unbracket(words: list[str]) -> list[str]:
    return [w.removeprefix("[").removesuffix("]") for w in words]


def _placeholder(words: list[str], unavailable: dict[str, str]) -> str | None:
    for w in words:
        for part in re.split(r"[=|]", w):
            if part in PLACEHOLDERS:
                return f"{part}: {PLACEHOLDERS[part]}"
            if part.startswith("~"):
                return f"{part}: your checkpoint"
            for path, why in unavailable.items():
                if part == path or part.startswith(path.rstrip("/") + "/"):
                    return f"{part}: {why}"
    return None


def plan(words: list[str], text: str, line: int, mark: str, unavailable: dict[str, str]) -> Command:
    """What the test does with one README command, and why. The `--out` of a command that is only parsed goes
    (or of a benchmark that is not run) goes into `unavailable`, so that the commands reading it are only parsed too."""
    c = _plan(words, text, line, mark, unavailable)
    if c.action in ("parse", "skip") and "--out" in c.argv[:-1]:
        unavailable[c.argv[c.argv.index("--out") + 1]] = f"written by README.md:{line}, which is not run here"
    return c


def _plan(words: list[str], text: str, line: int, mark: str, unavailable: dict[str, str]) -> Command:
    words = _unbracket(words)
    cli: list[str] = []
    if words[0] == "llama-adapter":
        cli = words[1:]
    elif words[:3] == ["python", "-m", "llama_adapter"]:
        cli = words[3:]
    elif words[0] == "torchrun":
        i = words.index("llama_adapter")
        return Command(
            words, text, line, "parse", "needs several processes (tests/test_distributed.py)", words[i + 1 :]
        )
    elif words[0] == "pip" or words[:3] == ["python", "-m", "pytest"]:
        return Command(words, text, line, "skip", "installation / the whole suite: .ci/run runs it as written")
    elif words[0] == "curl":
        return Command(words, text, line, "skip", "a client of the server: the Python client example runs instead")
    elif words[0] == "lm_eval":
        return Command(words, text, line, "skip", "an evaluation client of the server: tests/test_lm_eval.py runs it")
    elif words[0] == "python" and words[1].startswith("benchmarks/"):
        assert (ROOT / words[1]).is_file(), f"README.md:{line}: {words[1]} does not exist"
        if words[1] in RUNNABLE_BENCHMARKS and not mark.startswith("skip"):
            return Command(words, text, line, "run")
        return Command(words, text, line, "skip", "a benchmark: minutes of measurement")
    else:
        raise AssertionError(f"README.md:{line}: no rule for {text!r}: add one to tests/test_readme.py")
    if mark.startswith("skip"):
        return Command(words, text, line, "parse", mark, cli)
    why = _placeholder(cli, unavailable)
    if why:
        return Command(words, text, line, "parse", why, cli)
    if cli[0] == "chat":
        return Command(words, text, line, "parse", "interactive", cli)
    if mark.startswith("background"):
        return Command(words, text, line, "background", "", cli)
    if any(w.startswith("../shared") for w in cli) and not SHARED.is_dir():
        return Command(words, text, line, "parse", f"no {SHARED} beside this checkout", cli)
    return Command(words, text, line, "run", "", cli)


def readme_commands() -> list[tuple[Block, Command]]:
    unavailable: dict[str, str] = {}
    return [
        (b, plan(w, t, n, b.mark, unavailable))
        for b in blocks(README.read_text())
        if b.lang == "bash"
        for w, t, n in commands(b)
    ]


def assemble(parts_dir: Path = ROOT / "docs" / "parts") -> str:
    """The README's parts section from docs/parts/*.md (their links are relative to docs/parts/)."""
    texts = [(parts_dir / f"{p}.md").read_text() for p in PARTS]
    return re.sub(r"\]\(\.\./(?!\.\./)", "](docs/", "\n".join(texts))


def _parts_span(text: str) -> tuple[int, int]:
    start = text.index("<!-- PARTS -->\n") + len("<!-- PARTS -->\n")
    return start, text.index("<!-- /PARTS -->")


# ---- fast checks -----------------------------------------------------------------------------------------
def test_readme_parts_match_docs_parts() -> None:
    text = README.read_text()
    a, b = _parts_span(text)
    assert text[a:b] == assemble(), "README.md and docs/parts/*.md differ: edit the part, then run " + (
        "`python tests/test_readme.py --write`"
    )


def test_no_machine_specific_paths() -> None:
    """Shared data is named relative to the checkout (`../shared/...`), never by one machine's absolute path."""
    bad = re.compile(r"(?<![\w.~])/(work|home|Users|tmp|mnt|root|srv|opt)/")
    for f in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            assert not bad.search(line), f"{f.relative_to(ROOT)}:{n}: absolute path: {line.strip()}"


def test_every_readme_command_parses() -> None:
    from llama_adapter.cli import build_parser

    parser = build_parser()
    cmds = readme_commands()
    assert sum(c.action == "run" for _, c in cmds) >= 8  # most commands run for real, not only parse
    for _, c in cmds:
        if c.cli:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    parser.parse_args(c.cli)
                except SystemExit:
                    pytest.fail(f"README.md:{c.line}: `{c.text}` does not parse: {err.getvalue().strip()}")


def test_python_blocks_compile() -> None:
    for b in blocks(README.read_text()):
        if b.lang == "python":
            compile(b.code, f"README.md:{b.line}", "exec")


# ---- the walkthrough -------------------------------------------------------------------------------------
def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_server(c: Command, cwd: Path, log: Path) -> tuple[subprocess.Popen | None, str]:
    if _port_open(SERVER_PORT):
        return None, f"port {SERVER_PORT} is taken on this machine"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_adapter", *c.cli], cwd=cwd, stdout=f, stderr=f, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{SERVER_PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, ""
        except OSError:
            time.sleep(0.5)
    proc.kill()
    return None, f"the server did not answer /health in 90 s: {log.read_text()[-2000:]}"


def _run_cli(c: Command) -> str | None:
    """Run a llama-adapter command in-process (with its cap); the error, or None."""
    import torch

    from llama_adapter.cli import main

    argv = c.cli + CAPS.get(" ".join(c.cli[:2]), CAPS.get(c.cli[0], []))
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return None if rc == 0 else f"exit {rc}: {(out.getvalue() + err.getvalue())[-2000:]}"


def _run_script(c: Command, cwd: Path) -> str | None:
    argv = [sys.executable, *c.argv[1:], *CAPS.get(c.argv[1], [])]
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    return None if p.returncode == 0 else f"exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}"


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory laid out like a checkout, with ../shared beside it when the real checkout has one."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("recipes", "benchmarks"):
        (work / name).symlink_to(ROOT / name)
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    return work


def test_readme_runs_as_written(checkout: Path) -> None:
    failures: list[str] = []
    report: list[str] = []
    done: set[str] = set()
    unavailable: dict[str, str] = {}
    server: subprocess.Popen | None = None
    server_down = "no server started before this block"
    try:
        for b in blocks(README.read_text()):
            where = f"README.md:{b.line}"
            if b.lang == "python":
                if b.mark.startswith("skip") or (b.mark.startswith("needs-server") and server is None):
                    report.append(f"{where}: python compiled only ({b.mark or server_down})")
                    continue
                t = time.monotonic()
                try:
                    exec(compile(b.code, where, "exec"), {"__name__": "__readme__"})
                except Exception as e:  # noqa: BLE001 (every failure is reported with its block)
                    failures.append(f"{where}: python block raised {type(e).__name__}: {e}")
                report.append(f"{where}: python ran ({time.monotonic() - t:.1f} s)")
                continue
            if b.lang != "bash":
                continue
            for w, text, line in commands(b):
                c = plan(w, text, line, b.mark, unavailable)
                where = f"README.md:{c.line}"
                if c.action in ("parse", "skip") or c.text in done:
                    report.append(f"{where}: {c.action} `{c.text}` ({c.reason or 'ran already'})")
                    continue
                done.add(c.text)
                t = time.monotonic()
                if c.action == "background":
                    server, server_down = _start_server(c, checkout, checkout.parent / "server.log")
                    if server is None:
                        report.append(f"{where}: server not started: {server_down}")
                    continue
                error = _run_cli(c) if c.cli else _run_script(c, checkout)
                if error:
                    failures.append(f"{where}: `{c.text}` failed: {error}")
                report.append(f"{where}: ran `{c.text}` ({time.monotonic() - t:.1f} s)")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    print("\n".join(report))  # shown by pytest when the test fails, or with -s
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = README.read_text()
        a, b = _parts_span(text)
        README.write_text(text[:a] + assemble() + text[b:])
        print(f"rewrote the parts section of {README}")
    else:
        print(__doc__)
