"""Output folders and the recipe's tokenizer are checked at setup, before the first step: a run that could not
save or export exits 2 naming the key at once, and no step is trained first."""

from pathlib import Path

import pytest

from tests.train.conftest import recipe, run_cli


def said(p, text: str) -> bool:
    """`text` is in the error output, however the console wrapped it."""
    return "".join(text.split()) in "".join(p.stderr.split())


@pytest.mark.parametrize("key", ["checkpoint.folder", "checkpoint.hf_export", "run_dir"])
def test_an_unwritable_output_folder_is_refused_before_the_first_step(tiny_data, tmp_path, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run_dir = tmp_path / "run"
    rec = recipe(tiny_data, run_dir)
    p = run_cli(rec, tmp_path, f"{key}={blocker / 'sub'}", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert said(p, f"{key} = {blocker / 'sub'} cannot be written")
    assert "Traceback" not in p.stderr
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # nothing trained


def test_a_missing_tokenizer_is_refused_before_the_first_step(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-tokenizer"
    p = run_cli(recipe(tiny_data, run_dir), tmp_path, f"tokenizer={missing}", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert said(p, f"tokenizer = {missing} does not exist")
    assert not (run_dir / "metrics.jsonl").exists()
    assert not Path(run_dir / "checkpoints" / "latest").exists()
