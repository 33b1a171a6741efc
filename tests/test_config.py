"""Bad input gets one clear sentence naming the key or path, exit code 2, and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline import cli, config
from tests.conftest import REPO, demo_params


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    return str(path)


def test_default_params_file_is_valid():
    settings = config.load(REPO / "params.yaml")
    assert settings.train.datasets == ["real_youtube", "faceswap"]
    assert settings.data.datasets["faceswap"].label == "fake"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["train"].update(bogus=1), "unknown key 'train.bogus'"),
        (lambda p: p["extract"].update(batch_size="big"), "extract.batch_size must be a whole number"),
        (lambda p: p["train"].update(C=0.1), "train.C must be a list"),
        (lambda p: p["evaluate"].update(datasets=["celebdf"]), "evaluate.datasets names 'celebdf'"),
        (lambda p: p["train"].update(datasets=["faceswap"]), "at least one real and one fake"),
        (lambda p: p["evaluate"].update(datasets=["real_youtube"]), "a real dataset"),
        (lambda p: p["extract"].update(format="zarr"), "choose one of: parquet"),
        (lambda p: p["data"]["split"].update(test=1.5), "data.split.test is 1.5"),
        (lambda p: p["data"]["datasets"]["faceswap"].update(label="fak"), "choose one of: real | fake"),
        (lambda p: p.pop("model"), "missing the required key 'model'"),
        (lambda p: p.update(extract=None), "extract is empty; write `extract: {}` for all its defaults"),
        (
            lambda p: p["data"]["datasets"].update({"ffpp/c40": {"path": "Train_Real/Real_youtube", "label": "real"}}),
            "a dataset named 'ffpp/c40'; a name may not be blank or hold '/'",
        ),
        (lambda p: p["train"].update(layer="block_3"), "add it to model.layers and re-run extract"),
        (lambda p: p["data"].update(video_pattern="(.*)"), "named group (?P<video>"),
        (lambda p: p["train"].update(C=[float("nan")]), "train.C[0] is nan; it must be a finite number"),
        (lambda p: p["train"].update(C=[float("inf")]), "train.C[0] is inf; it must be a finite number"),
        (lambda p: p["train"].update(max_iter=-5), "train.max_iter is -5; it must be at least 1"),
        (lambda p: p["train"].update(epochs=0), "train.epochs is 0; it must be at least 1"),
        (lambda p: p["data"].update(frames={"per_video": 0}), "data.frames.per_video is 0; use at least 1"),
        (lambda p: p["train"].update(probe="mlp", stream=True), "train.probe mlp reads the cache in memory"),
        (lambda p: p["data"].update(frames={"sampling": "random"}), "data.frames.sampling"),
        (lambda p: p["extract"].update(device="meta"), "extract.device is 'meta'; use auto, cpu, cuda"),
        (lambda p: p["model"].update(layers=["projection", "projection"]), "names 'projection' more than once"),
        (lambda p: p["data"].update(faces={"detector": "retinaface"}), "use dlib_hog, dlib_cnn, mtcnn or onnx:<path"),
        (lambda p: p["data"].update(faces={"upsample": 3}), "data.faces.upsample"),
        (
            lambda p: p["evaluate"].update(robustness={"noise": [10, 0.05]}),
            "evaluate.robustness.noise[1] is 0.05, in 8-bit levels (0-255), where it changes almost no pixel",
        ),
        (lambda p: p["data"]["split"].update(val=0.5, test=0.5), "must leave some data for training"),
        (lambda p: p["data"].update(video_pattern="(?P<video>"), "data.video_pattern is not a valid regular"),
        (lambda p: p["data"].update(datasets={}), "data.datasets is empty"),
        (lambda p: p["data"].update(faces={"scale": 0}), "data.faces needs scale > 0"),
        (lambda p: p["evaluate"].update(zero_shot={"prompts": {"real": ["a face"], "fake": []}}), "two non-empty"),
        (lambda p: p["evaluate"].update(seeds=[]), "evaluate.seeds is empty"),
        (lambda p: p["evaluate"].update(bootstrap=-1), "evaluate.bootstrap must be 0"),
        (lambda p: p["model"].update(layers=[]), "model.layers is empty"),
        (lambda p: p["train"].update(layer=[]), "train.layer is an empty list"),
        (lambda p: p["train"].update(hidden=0), "train.hidden is 0; it must be at least 1"),
        (lambda p: p["extract"].update(dask={"n_workers": 0}), "extract.dask.n_workers must be at least 1"),
        (lambda p: p["extract"].update(num_workers=-1), "extract.num_workers must be 0"),
        (lambda p: p.update(data=[1, 2]), "data must be a mapping"),
        (lambda p: p["extract"].update(compile="yes"), "extract.compile must be true or false"),
        (lambda p: p["data"]["split"].update(val="a tenth"), "data.split.val must be a number"),
        (lambda p: p["model"].update(name=""), "model.name must be a non-empty string"),
    ],
)
def test_bad_params_give_one_clear_sentence(tmp_path, capsys, tiny_clip, mutate, expected):
    params = demo_params(tmp_path, tiny_clip)
    mutate(params)
    code, err = run_cli(capsys, "train", "--params", write(tmp_path, params))
    assert code == 2
    assert expected in err
    assert err.startswith("error: ") and err.count("\n") == 1  # one line
    assert "Traceback" not in err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    code, err = run_cli(capsys, "manifest", "--params", write(tmp_path, "data:\n  root: [unclosed\nmodel: x\n"))
    assert code == 2
    assert "is not valid YAML at line" in err


def test_missing_params_file(tmp_path, capsys):
    code, err = run_cli(capsys, "manifest", "--params", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "nope.yaml does not exist" in err


def test_missing_dataset_folder_names_the_folder_and_the_key(tmp_path, capsys, tiny_clip):
    params = demo_params(tmp_path / "nowhere", tiny_clip)
    code, err = run_cli(capsys, "manifest", "--params", write(tmp_path, params))
    assert code == 2
    assert "does not exist; fix data.datasets." in err
    assert "nowhere" in err


def test_missing_model_directory_says_how_to_get_it(project, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["name"] = "no-such-org/no-such-model"
    path = write(project, params)
    assert run_cli(capsys, "manifest", "--params", path)[0] == 0
    code, err = run_cli(capsys, "extract", "--params", path)
    assert code == 2
    assert "huggingface-cli download no-such-org/no-such-model" in err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "config.json").write_text('{"model_type": "clip", '), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "clip", "vision_config": 7}'), "could not be loaded"),
        (
            lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
            "has only pytorch_model.bin (pickle files, never loaded here); convert it",
        ),
    ],
)
def test_a_broken_model_directory_is_one_clear_sentence(project, tiny_clip, capsys, damage, expected):
    model = project / "model"
    shutil.copytree(tiny_clip, model)
    damage(model)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["name"] = str(model)
    path = write(project, params)
    assert run_cli(capsys, "manifest", "--params", path)[0] == 0
    code, err = run_cli(capsys, "extract", "--params", path)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err


def test_stage_before_its_inputs_exist_says_which_stage_to_run(project, capsys):
    code, err = run_cli(capsys, "train", "--params", str(project / "params.yaml"))
    assert code == 2
    assert "run the manifest stage first" in err


def test_a_damaged_stage_output_says_which_stage_to_rerun(project, capsys):
    # Cut short by a full disk or a stopped copy: one sentence naming the file, never a traceback.
    (project / "cache").mkdir(exist_ok=True)
    (project / "cache" / "manifest.parquet").write_bytes(b"PAR1 and then nothing")
    code, err = run_cli(capsys, "train", "--params", str(project / "params.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert "manifest.parquet is damaged" in err and "`dvc repro manifest`" in err
    (project / "metrics").mkdir()
    (project / "metrics" / "evaluate.json").write_text('{"faceswap": {"frame": ')
    code, err = run_cli(capsys, "show", "--params", str(project / "params.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert "evaluate.json is damaged" in err and "`dvc repro evaluate`" in err
    (project / "metrics" / "evaluate.json").write_text("{}")
    (project / "metrics" / "scores.csv").write_text("test_set,digest,video,label,score\nfaceswap,ab12,000")
    code, err = run_cli(capsys, "compare", "--params", str(project / "params.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert "the workspace run's params.yaml or metrics are damaged" in err


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    for command in ("manifest", "extract", "train", "evaluate", "show", "demo"):
        assert command in out


def test_windows_is_one_sentence_that_points_to_wsl():
    """The pipeline needs POSIX (file locks, fork hooks, non-blocking opens): on Windows the CLI
    says so and where to run it, instead of failing to import `fcntl`."""
    code = "import runpy, sys; sys.platform = 'win32'; runpy.run_module('pipeline', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "WSL" in run.stderr


def test_train_and_evaluate_do_not_import_torch():
    code = "import sys, pipeline.cli, pipeline.train, pipeline.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "False"


def test_a_stage_exits_without_the_module_teardown(tmp_path):
    """`python -m pipeline` skips Python's teardown of modules (a second per stage once torch is
    imported): an object that a module holds is never finalised, and the exit code is the stage's."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "class Module:\n"
        "    def __del__(self):\n"
        "        os.write(2, b'module teardown')\n"
        "kept_until_teardown = Module()\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "show", "--params", "missing.yaml"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2
    assert "params file missing.yaml does not exist" in done.stderr
    assert "module teardown" not in done.stderr


def test_leave_still_does_what_python_does_at_exit(tmp_path):
    """`cli.leave` joins threads, runs the atexit handlers (temporary folders removed) and writes
    buffered output before it ends the process with the stage's exit code. A thread pool left
    open (its idle workers wait for work) is told to stop, as at Python's own exit, not waited on."""
    code = f"""
import atexit, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pipeline.cli import leave

scratch = tempfile.TemporaryDirectory(dir={str(tmp_path)!r})
left_open = ThreadPoolExecutor(2)
left_open.submit(int).result()
atexit.register(print, "atexit ran")
threading.Thread(target=lambda: (time.sleep(0.2), print("thread finished"))).start()
sys.stdout.write("buffered|")
leave(3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered|thread finished\natexit ran\n"
    assert list(tmp_path.iterdir()) == []  # the TemporaryDirectory's finalizer ran


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_after_the_stage_finished_ends_it_at_once_and_quietly(stop):
    """Ctrl-C or SIGTERM that comes once the stage's work is done and closed, while `cli.leave`
    runs the exit's handlers (stopping DataLoader workers, removing temporary folders), printed
    "Exception ignored in atexit callback ... KeyboardInterrupt" (seen once in 80 Ctrl-Cs of a
    demo extract). The process now ends at once, with the stage's exit code, output flushed."""
    code = f"""
import atexit, os, signal, sys, time
from pipeline.cli import leave, stop_on_sigterm

stop_on_sigterm()
atexit.register(print, "not reached: the stop ended the exit")
atexit.register(lambda: (os.kill(os.getpid(), signal.{stop}), time.sleep(20)))  # runs first
sys.stdout.write("done|")
leave(0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "done|", "")


def test_a_stage_under_a_profiler_exits_normally_so_the_profile_is_written(tmp_path):
    profile = tmp_path / "extract.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pipeline", "show", "--params", "missing.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert "params file missing.yaml does not exist" in done.stderr  # (cProfile itself exits 0)
    assert profile.stat().st_size > 0


def test_a_stopped_command_says_what_it_kept(monkeypatch, capsys):
    """Ctrl-C or SIGTERM on `evaluate` said "committed shards are kept; run the same command again
    to resume", which is extract's (and predict's) story: each command says its own."""

    def stopped(stop):
        def dispatch(args):
            raise stop

        return dispatch

    expected = {
        "extract": "committed shards are kept; run the same command again to resume.",
        "scan": "the files read so far are remembered; run the same command again to read the rest.",
        "evaluate": "run the same command again.",
    }
    stops = ((KeyboardInterrupt, "interrupted", 130), (cli.Terminated, "terminated (SIGTERM)", 143))
    for command, sentence in expected.items():
        for stop, said, code in stops:
            monkeypatch.setattr(cli, "dispatch", stopped(stop))
            assert run_cli(capsys, command) == (code, f"{said}: {sentence}\n")
