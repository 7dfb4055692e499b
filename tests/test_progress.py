"""Progress: a tqdm bar on a terminal, one line per 10 % anywhere else (Prefect logs, dvc repro, CI)."""

from __future__ import annotations

import io

from pickstyle.progress import LineProgress, progress


def test_not_a_terminal_one_line_per_ten_percent() -> None:
    out = io.StringIO()
    assert list(progress(range(250), desc="clips", unit="shard", file=out)) == list(range(250))
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("clips:  10% 25/250 shard") and lines[-1].startswith(
        "clips: 100% 250/250 shard"
    )


def test_manual_updates_resume_and_postfix() -> None:
    out = io.StringIO()
    bar = progress(total=600, initial=300, desc="train", unit="step", file=out)  # resumed at step 300
    assert isinstance(bar, LineProgress)
    for _ in range(300):
        bar.update(1)
        bar.set_postfix(loss="0.1234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["60%", "70%", "80%", "90%", "100%"]
    assert lines[-1].endswith("loss=0.1234")


def test_few_items_disabled_and_stopped_early() -> None:
    out = io.StringIO()
    list(progress(["a", "b", "c"], desc="w", file=out))
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["33%", "66%", "100%"]
    out = io.StringIO()
    list(progress(range(5), desc="w", file=out, disable=True))
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = progress(total=100, desc="train", file=out)
    bar.update(5)
    bar.close()  # a run that stops early still says where it stopped
    assert out.getvalue().startswith("train:   5% 5/100")


def test_a_terminal_gets_tqdm() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm.auto import tqdm

    bar = progress(range(3), desc="x", file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
