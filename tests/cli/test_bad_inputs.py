"""Every bad input a user can give is refused before anything starts, with one message that names what is wrong
and how to fix it, exit code 2, and no traceback (issue #15, part 7).

Each row runs the real command in this process (it must refuse before starting a SuperLink, Ray or a node); two
rows run it as a real process too, to prove no traceback reaches the terminal. The node-side reader
(``read_examples``, what a deployed node's ClientApp runs) gets the same bad files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.client.data import DataError, read_examples
from pollinate.proto.run_config import DataConfig, ModelConfig
from tests.support.paths import TINY

# The bad data files, by name: what a user might hand `simulate --corpus` or `client --data`.
BAD_FILES: dict[str, bytes] = {
    "latin1.jsonl": b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n',
    "broken.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": \n',
    "float-label.jsonl": b'{"text": "a", "label": 1}\n{"text": "b", "label": 1.7}\n',
    "bool-label.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", "label": true}\n',
    "number-text.jsonl": b'{"text": "a", "label": 0}\n{"text": 123, "label": 1}\n',
    "latin1.csv": b'text,label\ngood,1\ncaf\xe9,0\n',
    "broken-line.csv": b'text,label,speaker\ngood,democrat,a\nbad, really,republican,b\n',
    "empty-text.csv": b'text,label\ngood,1\n"",0\n',
}
# file -> what the refusal says (it names the file too, checked below)
DATA_ERRORS = {
    "latin1.jsonl": "line 2: byte 0xe9 is not UTF-8 text; save the file as UTF-8",
    "broken.jsonl": "line 3: not valid JSON",
    "float-label.jsonl": "row 2: label 1.7 is not an integer in [0, 2)",
    "bool-label.jsonl": "row 2: label true is not an integer in [0, 2)",
    "number-text.jsonl": "row 2: 'text' is 123, not a string of text",
    "latin1.csv": "line 3: byte 0xe9 is not UTF-8 text",
    "broken-line.csv": "row 2 (line 3): more fields than the header's 3; quote fields that hold commas",
    "empty-text.csv": "row 2: 'text' is empty; remove the row or fill in its text",
}

# (what is wrong, the command after `pollinate`, what the message says); {tmp} is the test's directory.
ROWS: list[tuple[str, list[str], str]] = [
    ("db-unknown-scheme", ["runs", "--db", "foo://x"],
     "--db 'foo://x': 'foo' is not a database pollinate can open; give a URL such as sqlite:///"),
    ("db-not-a-url", ["runs", "--db", "notaurl"], "--db 'notaurl' is not a database URL"),
    ("simulate-db-unknown-scheme", ["simulate", TINY, "--db", "foo://x"], "'foo' is not a database pollinate can open"),
    ("server-db-unknown-scheme", ["server", TINY, "--db", "foo://x"], "'foo' is not a database pollinate can open"),
    ("output-under-a-file", ["simulate", TINY, "--output", "{tmp}/a-file/out"],
     "{tmp}/a-file is a file, not a directory; give a directory"),
    ("alpha-nan", ["simulate", TINY, "--set", "adapter.alpha=nan"],
     "adapter.alpha = nan is invalid: use a finite number"),
    ("lr-inf", ["simulate", TINY, "--set", "train.lr=inf"], "train.lr = inf is invalid: use a finite number"),
    ("clip-norm-inf", ["simulate", TINY, "--set", "privacy.clip-norm=inf"],
     "privacy.clip-norm = inf is invalid: use a finite number"),
    ("server-lr-inf", ["server", TINY, "--set", "train.lr=-inf"], "train.lr = -inf is invalid: use a finite number"),
    ("status-port-99999", ["server", "--status-port", "99999"],
     "argument --status-port: 99999 is outside the valid range 1..65535"),
    ("port-70000", ["server", "--port", "70000"], "argument --port: 70000 is outside the valid range 1..65535"),
    ("port-0", ["server", "--port", "0"], "argument --port: 0 is outside the valid range 1..65535"),
    ("port-not-a-number", ["server", "--port", "http"], "argument --port: 'http' is not a port number; use 1..65535"),
    ("runtime-port-99999", ["client", "--superlink", "127.0.0.1:9092", "--data", "{tmp}/broken.jsonl",
                            "--runtime-port", "99999"], "argument --runtime-port: 99999 is outside the valid range"),
    ("superlink-port-99999", ["client", "--superlink", "coordinator:99999", "--data", "{tmp}/broken.jsonl"],
     "argument --superlink: 99999 is outside the valid range 1..65535"),
    ("superlink-without-port", ["client", "--superlink", "coordinator", "--data", "{tmp}/broken.jsonl"],
     "argument --superlink: 'coordinator' is not HOST:PORT, e.g. coordinator.example.org:9092"),
    ("coordinator-port-99999", ["status", "--coordinator", "127.0.0.1:99999"],
     "argument --coordinator: 99999 is outside the valid range 1..65535"),
    ("open-host-without-tls", ["server", TINY, "--host", "0.0.0.0"],
     "--host 0.0.0.0 without --certs would serve the SuperLink"),
    ("dns-host-without-tls", ["server", TINY, "--host", "coordinator.example.org"],
     "or --host 127.0.0.1, or --insecure on a network you trust"),
    ("missing-tls-file", ["server", TINY, "--certs", "{tmp}/certs"],
     "{tmp}/certs/server.key missing; create the directory with `pollinate certs"),
    ("san-not-an-ip", ["certs", "{tmp}/new-certs", "--host", "999.1.1.1"],
     "--host 999.1.1.1 is not a valid IP address (each IPv4 part is 0..255)"),
    ("san-not-a-name", ["certs", "{tmp}/new-certs", "--host", "coord inator"],
     "--host 'coord inator' is neither an IP address nor a DNS name"),
    *[(f"corpus-{name}", ["simulate", TINY, "--corpus", f"{{tmp}}/{name}"], f"{{tmp}}/{name} {says}")
      for name, says in DATA_ERRORS.items()],
    # A node refuses bad data before it connects (no SuperLink listens on port 9): the node cannot know the run's
    # model.num-labels, so only a label that is no non-negative integer is refused there.
    *[(f"client-{name}", ["client", "--superlink", "127.0.0.1:9", "--data", f"{{tmp}}/{name}", "--wait", "1"],
       f"{{tmp}}/{name} {says.split(' in [0, 2)')[0]}") for name, says in DATA_ERRORS.items()],
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The bad files, a regular file to put --output under, and a certificate directory missing server.key."""
    for name, data in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a-file").write_text("not a directory\n")
    assert main(["certs", str(tmp_path / "certs"), "--nodes", "0"]) == 0
    (tmp_path / "certs" / "server.key").unlink()
    return tmp_path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``pollinate ARGV`` in this process: exit code, and stdout + stderr with white space folded."""
    capsys.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)  # `pollinate server` takes SIGTERM over once it gets going
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses a flag's value this way
        code = int(e.code or 0)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@pytest.mark.parametrize("argv, says", [pytest.param(a, s, id=i) for i, a, s in ROWS])
def test_a_bad_input_is_refused_with_what_and_how_to_fix(argv: list[str], says: str, workdir: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)  # a default store or output lands here, never in the checkout
    monkeypatch.delenv("POLLINATE_DB", raising=False)
    argv = [a.replace("{tmp}", str(workdir)) for a in argv]
    if argv[0] in ("simulate", "server") and "--db" not in argv:
        argv += ["--db", f"sqlite:///{workdir / 'store.db'}"]
    code, said = _run(argv, capsys)
    assert code == 2, said
    assert says.replace("{tmp}", str(workdir)) in said, said
    assert "Traceback" not in said
    assert not any(workdir.rglob("simulation-*")) and not any(workdir.rglob("superlink")), "nothing was started"
    assert not (workdir / "new-certs").exists() or not any((workdir / "new-certs").iterdir()), "no file was written"


@pytest.mark.parametrize("name", sorted(DATA_ERRORS))
def test_the_node_reader_names_the_file_and_the_row(name: str, workdir: Path) -> None:
    with pytest.raises(DataError) as refused:
        read_examples(workdir / name, DataConfig(), ModelConfig())
    assert str(refused.value).startswith(f"{workdir / name} ")
    assert DATA_ERRORS[name] in str(refused.value)


def test_good_labels_in_every_spelling_are_read(tmp_path: Path) -> None:
    """The strict reading refuses only what is lossy: 1, 1.0 and a CSV's "1" stay the label 1."""
    jsonl = tmp_path / "good.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0.0}\n')
    csv = tmp_path / "good.csv"
    csv.write_text('text,label\n"a, with a comma",1\nb,0\n')
    for path in (jsonl, csv):
        assert [e.label for e in read_examples(path, DataConfig(), ModelConfig())] == [1, 0]


@pytest.mark.parametrize("argv, says", [
    (["server", TINY, "--host", "0.0.0.0"], "--host 0.0.0.0 without --certs would serve the SuperLink"),
    (["simulate", TINY, "--corpus", "{tmp}/broken.jsonl"], "{tmp}/broken.jsonl line 3: not valid JSON"),
])
def test_no_traceback_reaches_the_terminal(argv: list[str], says: str, workdir: Path) -> None:
    argv = [a.replace("{tmp}", str(workdir)) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "POLLINATE_DB"}
    done = subprocess.run([sys.executable, "-m", "pollinate.cli", *argv, "--db", f"sqlite:///{workdir / 's.db'}"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert says.replace("{tmp}", str(workdir)) in said
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
