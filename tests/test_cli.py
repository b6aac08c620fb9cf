"""The command-line tools: every --help works, shared flags parse once, and a user's mistake ends in one
line ``severjax-<tool>: error: ...`` and exit status 2 (a traceback only with SEVERJAX_DEBUG=1)."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from severjax.cli import errors
from severjax.data import kaggle
from severjax.data.rle import rle_encode

TOOLS = ("predict", "score", "tune", "pseudo_label", "convert_weights", "make_synthetic")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_of_every_tool(tool, capsys):
    module = importlib.import_module(f"severjax.cli.{tool}")
    assert callable(module.entry)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: severjax-{tool.replace('_', '-')}") and "--help" in text


def test_python_m_help():
    run = subprocess.run([sys.executable, "-m", "severjax.cli.score", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--truth" in run.stdout and "--submission" in run.stdout


def score(*args, debug=False):
    env = dict(os.environ)
    env.pop(errors.DEBUG_ENV, None)
    if debug:
        env[errors.DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "severjax.cli.score", *args], capture_output=True, text=True,
                          env=env)


def one_line_error(run, tool="score"):
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"severjax-{tool}: error: "), run.stderr
    return lines[0]


@pytest.fixture
def truth(tmp_path):
    mask = np.zeros((256, 1600), bool)
    mask[10:20, 30:40] = True
    rows = {"a.jpg": [rle_encode(mask), "", "", ""], "b.jpg": ["", "", "", ""]}
    kaggle.write_submission(str(tmp_path / "truth.csv"), rows)
    return str(tmp_path / "truth.csv")


def test_score_duplicated_row(truth, tmp_path):
    bad = tmp_path / "dup.csv"
    bad.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,2,5 3\na.jpg,1,9 2\n")
    line = one_line_error(score("--truth", truth, "--submission", str(bad)))
    assert f"{bad}:4: duplicate row for image a.jpg class 1 (first at line 2)" in line


def test_score_too_long_run(truth, tmp_path):
    bad = tmp_path / "long.csv"
    bad.write_text("ImageId_ClassId,EncodedPixels\na.jpg_1,409599 3\na.jpg_2,\na.jpg_3,\na.jpg_4,\n")
    line = one_line_error(score("--truth", truth, "--submission", str(bad)))
    assert f"{bad}:2: bad RLE for image a.jpg class 1" in line and "start 409599, length 3" in line
    assert "past the end" in line
    # SEVERJAX_DEBUG=1: the exception itself, traceback and all.
    run = score("--truth", truth, "--submission", str(bad), debug=True)
    assert run.returncode != 0 and "Traceback" in run.stderr and "past the end" in run.stderr


def test_score_missing_file_and_bad_flag(truth, tmp_path):
    line = one_line_error(score("--truth", truth, "--submission", str(tmp_path / "nope.csv")))
    assert f"CSV {tmp_path / 'nope.csv'} does not exist" in line
    line = one_line_error(score("--truth", truth, "--submission", truth, "--bogus", "1"))
    assert "unrecognized arguments: --bogus 1" in line
    line = one_line_error(score("--truth", truth))
    assert "--submission" in line


def test_score_unreadable_csv(truth, tmp_path):
    bad = tmp_path / "binary.csv"
    bad.write_bytes(b"ImageId,ClassId,EncodedPixels\n\xff\xfe,1,2\n")
    line = one_line_error(score("--truth", truth, "--submission", str(bad)))
    assert f"{bad}: not UTF-8 text" in line


def test_run_turns_user_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)

    def missing_key():
        raise KeyError("2 image(s) of the requested order have no prediction:\n['x.jpg', 'y.jpg']")

    assert errors.run("demo", missing_key) == 2
    assert capsys.readouterr().err == ("severjax-demo: error: 2 image(s) of the requested order have no "
                                       "prediction: ['x.jpg', 'y.jpg']\n")
    assert errors.run("demo", lambda: None) == 0

    def bug():
        raise ZeroDivisionError("not a user error")

    with pytest.raises(ZeroDivisionError):
        errors.run("demo", bug)
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        errors.run("demo", missing_key)


def test_shared_flags_build_the_postprocess_config():
    from severjax.cli import flags
    from severjax.predict.postprocess import PostprocessConfig

    parser = errors.parser("demo", None)
    flags.add_ensemble_flags(parser, required=False)
    flags.add_postprocess_flags(parser)
    args = parser.parse_args(["--thresholds", "0.4,0.5,0.6,0.7", "--min_area", "0,10,20,30", "--dilate", "3",
                              "--min_component", "5", "--connectivity", "4", "--weights", "1,2"])
    assert flags.postprocess_config(args) == PostprocessConfig(thresholds=(0.4, 0.5, 0.6, 0.7),
                                                               min_area=(0, 10, 20, 30), min_component=5,
                                                               connectivity=4, dilate=3)
    assert args.weights == (1.0, 2.0) and args.checkpoint == [] and args.batch_size == 8
    assert flags.postprocess_config(parser.parse_args([])) == PostprocessConfig()
    with pytest.raises(errors.UsageError, match=r"argument --thresholds: '0.5,x': expected comma-separated"):
        parser.parse_args(["--thresholds", "0.5,x"])
    with pytest.raises(errors.UsageError, match="argument --batch_size: 0 must be >= 1"):
        parser.parse_args(["--batch_size", "0"])
    with pytest.raises(errors.UsageError, match="argument --tta: invalid choice"):
        parser.parse_args(["--tta", "x"])
    with pytest.raises(ValueError, match="need 4 values each"):
        flags.postprocess_config(parser.parse_args(["--thresholds", "0.5,0.5"]))
    assert flags.floats("1,2.5", "--x") == (1.0, 2.5) and flags.join((0.5, 600.0)) == "0.5,600"
    with pytest.raises(ValueError, match="--x 'a': expected comma-separated numbers"):
        flags.floats("a", "--x")
