"""qat-train and qat-sweep refuse bad input as a user meets it: one `error:` line, exit status 2,
before Ray or MLflow start, with nothing written (no run, no directory). How fast that is belongs
to benchmarks/failure_cases.py, not to a test on a shared machine."""

from __future__ import annotations

import os

import pytest
from helpers_cli import run_cli

DIGITS = ["model=digits_cnn", "data=digits", "model.pretrain_epochs=15"]


@pytest.mark.parametrize("program,args,message", [
    ("qat-train", ["name=../../escaped_train"], "error: name='../../escaped_train' is not allowed; allowed: letters"),
    ("qat-train", ["name=a/b"], "error: name='a/b' is not allowed"),
    ("qat-train", ["quant.param_bw=eight"], "error: Error merging override quant.param_bw=eight; Value 'eight' of "
                                            "type 'str' could not be converted to Integer"),
    ("qat-train", ["model=digits_cnnn"], "error: In 'train': Could not find 'model/digits_cnnn'; Available options "
                                         "in 'model': bert_tiny, custom, digits_cnn"),
    ("qat-sweep", ["sweep=smok"], "error: In 'sweep': Could not find 'sweep/smok'"),
    ("qat-train", ["qat.lrr=1"], "error: Could not override 'qat.lrr'."),
    ("qat-train", ["qat.lr=inf"], "error: qat.lr=inf is not allowed; allowed: a finite number in (0, 10]"),
    ("qat-train", ["qat.lr=1e6"], "error: qat.lr=1000000.0 is not allowed"),
    ("qat-train", ["tracking.uri=http://127.0.0.1:1"], "error: tracking.uri='http://127.0.0.1:1': no MLflow server "
                                                       "answers there"),
    ("qat-train", ["tracking.uri=nosuch://x"], "error: tracking.uri='nosuch://x' is not a tracking URI MLflow can "
                                               "use"),
    ("qat-train", ["+model.args.bogus=1"], "error: model.args={'bogus': 1} do not fit 'digits_cnn': "),
    ("qat-train", ["quant.leaf_modules=[nosuch]"], "error: quant.leaf_modules: 'nosuch' is not a submodule of model "
                                                   "'digits_cnn'"),
    ("qat-train", ["trainer.num_workers=64"], "error: trainer.num_workers=64 x trainer.cpus_per_worker needs 64 "
                                              "CPU(s) per trial but this machine has"),
    ("qat-train", ["model.checkpoint=CORRUPT"], "error: model.checkpoint: "),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, baseline_cache, program, args, message):
    root = tmp_path / "out"
    args = [a.replace("CORRUPT", str(tmp_path / "random.pt")) for a in args]
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    proc = run_cli(program, [f"paths.root={root}", *DIGITS, *args], tmp_path, baseline_cache, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert not root.exists()  # no run directory, no MLflow database


def test_an_unwritable_or_file_output_root_is_refused(tmp_path, baseline_cache):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for root, message in ((afile, "is a file, not a directory"), (afile / "sub", "is not writable (Not a directory)")):
        proc = run_cli("qat-train", [f"paths.root={root}", *DIGITS], tmp_path, baseline_cache, check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
