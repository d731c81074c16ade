"""`pollinate report RUN`: every plot of a real stored run as a valid PNG, and one page that puts them together."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollinate.server.run_plots import RunData, node_parts, outcome_counts
from pollinate.server.store import RoundStore
from tests.support.commands import pollinate
from tests.support.inprocess import run_in_process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stored_run(recorded_run) -> tuple[Path, int]:
    """A real 2-round run stored on SQLite (tests/server/conftest.py): its workdir and run id."""
    return recorded_run[0], recorded_run[1]


def _db(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'store.db'}"


def _assert_pngs(out: Path, names: set[str]) -> None:
    assert {p.stem for p in out.glob("*.png")} == names
    for name in names:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 8_000, (name, len(data))  # a drawn plot, not an empty canvas


def test_report_writes_every_plot_and_a_page_that_shows_them(stored_run, capsys, tmp_path: Path) -> None:
    workdir, run_id = stored_run
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(workdir), "--out", str(tmp_path / "r"))
    assert code == 0, said
    out = tmp_path / "r"
    _assert_pngs(out, {"loss-accuracy", "bytes", "participation", "outcomes"})
    page = (out / "report.md").read_text()
    for name in ("loss-accuracy", "bytes", "participation", "outcomes"):
        assert f"]({name}.png)" in page
    assert "epsilon" not in {p.stem for p in out.glob("*.png")}
    assert f"# Run {run_id}: fedavg on tiny-bert" in page and "| status | completed |" in page
    assert "| federation.rounds | 2 |" in page  # the run's config
    assert "None: every node's every reply was accepted." in page
    assert str(out / "report.md") in said


def test_report_defaults_to_the_runs_output_directory(stored_run, capsys) -> None:
    workdir, run_id = stored_run
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(workdir))
    assert code == 0, said
    assert (workdir / "out" / f"run-{run_id}" / "report" / "report.md").is_file()


def test_participation_and_outcomes_count_every_node_every_round(stored_run) -> None:
    workdir, run_id = stored_run
    data = RunData.load(RoundStore(_db(workdir)), run_id)
    # round 1: query + train + eval, and round 0's evaluation (stored with round 1); round 2: train + eval
    assert outcome_counts(data) == {"accepted": [16, 8], "rejected": [0, 0], "failed": [0, 0]}
    assert {n: set(parts.values()) for n, parts in node_parts(data).items()} == {
        n: {"trained"} for n in data.node_labels}


def test_a_run_under_dp_gets_the_epsilon_plot_and_its_refusals(tmp_path: Path, capsys) -> None:
    # Local DP, z = 1, target 8: every node spends in rounds 1 and 2, and refuses round 3 (tests/privacy); 2 nodes.
    run_id = run_in_process("tiny.toml", tmp_path, clients=2, **{
        "privacy.mode": "local", "privacy.noise-multiplier": 1.0, "privacy.target-epsilon": 8,
        "privacy.clip-norm": 0.5, "federation.strategy": "ffa-lora"})
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(tmp_path), "--out", str(tmp_path / "r"))
    assert code == 0, said
    _assert_pngs(tmp_path / "r", {"loss-accuracy", "bytes", "participation", "outcomes", "epsilon"})
    page = (tmp_path / "r" / "report.md").read_text()
    assert "](epsilon.png)" in page and "| privacy.mode | local |" in page
    assert page.count("privacy budget: round 3 would raise") == 2  # each node's refusal, with its reason
    data = RunData.load(RoundStore(_db(tmp_path)), run_id)
    assert outcome_counts(data)["rejected"][2] + outcome_counts(data)["failed"][2] == 2


def test_an_unknown_run_is_one_line(stored_run, capsys, tmp_path: Path) -> None:
    workdir, _ = stored_run
    code, said = pollinate(capsys, "report", "99", "--db", _db(workdir), "--out", str(tmp_path / "r"))
    assert code == 2
    assert said.startswith("error: run 99 is not in the store") and "`pollinate runs` lists runs" in said
    assert "Traceback" not in said and not (tmp_path / "r").exists()


def test_an_out_that_is_a_file_or_cannot_be_created_is_one_line(stored_run, capsys, tmp_path: Path) -> None:
    workdir, run_id = stored_run
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(workdir), "--out", str(a_file))
    assert code == 2 and said == f"error: --out {a_file}: is a file, not a directory; give a directory (it is " \
                                  f"created if absent)"
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(workdir), "--out", str(a_file / "below"))
    assert code == 2 and said.startswith(f"error: --out {a_file / 'below'}: cannot create it (")
    assert "Traceback" not in said


def test_what_a_node_sent_is_text_on_the_page_never_html_or_markdown(capsys, tmp_path: Path) -> None:
    # A failed round whose one node's reason quotes a hostile reply, stored through the store's own API.
    from pollinate.server.store import ClientRecord, RoundRecord

    store = RoundStore(_db(tmp_path))
    run_id = store.start_run({"federation.rounds": 1}, "fedavg", "tiny-bert")
    hostile = "<img src=x onerror=alert(1)> ![t](http://evil.example/t.png) [x](http://evil.example) `a|b`"
    store.record_round(run_id, RoundRecord(
        number=1, participants=1, accepted=0, train_loss=None, eval_loss=None, eval_accuracy=None, bytes_up=0,
        bytes_down=0, duration_s=0.1, status="failed", reason="too few accepted updates",
        clients=[ClientRecord(node_id=7, phase="train", status="rejected", reason=hostile)]), None)
    code, said = pollinate(capsys, "report", str(run_id), "--db", _db(tmp_path), "--out", str(tmp_path / "r"))
    assert code == 0, said
    page = (tmp_path / "r" / "report.md").read_text()
    assert "round 1, node 1, train: rejected: &lt;img src=x onerror=alert(1)&gt; \\!\\[t\\](http://evil.example/" \
           "t.png) \\[x\\](http://evil.example) \\`a\\|b\\`" in page
    assert "<img" not in page and "![t]" not in page
