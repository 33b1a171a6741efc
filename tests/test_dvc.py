"""Real `dvc repro` in a temporary git repo holding a copy of the project: only what changed reruns."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.store import caches
from tests.conftest import DEMO_FRAMES, DEMO_VIDEOS, REPO, demo_params, paused_env, wait_until_paused

PROJECT_FILES = [
    "pipeline",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvc/config",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
]


MODULE_EXTRACT = ["-m", "pipeline", "extract"]


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # Python writes __pycache__ beside the code that DVC hashes, as on a user's machine (where
    # PYTHONDONTWRITEBYTECODE is rarely set; it hid that a teammate's fresh clone, without them,
    # saw every stage with a code folder as changed).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def copy_project(root: Path, **extract) -> Path:
    """A copy of this project in `root` (a new git + DVC repo) whose demo stage builds a smaller
    demo (the size the other tests use), with the test params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    pipeline["stages"]["demo"]["cmd"] += f" --videos {DEMO_VIDEOS} --frames {DEMO_FRAMES}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = demo_params("data/demo", "data/tiny-clip")
    params["extract"].update(extract)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    sh(root, "dvc", "init", "-q", "--force")  # recreates .dvc/: put this project's own files back
    for name in (n for n in PROJECT_FILES if n.startswith(".dvc/")):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / name, dirs_exist_ok=True)
        else:
            shutil.copy(REPO / name, root / name)
    return root


@pytest.fixture
def repo(tmp_path) -> Path:
    return copy_project(tmp_path / "repo")


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)


def test_repro_runs_only_what_changed_and_dvc_reads_the_results(repo):
    first = sh(repo, "dvc", "repro")
    assert ran(first) == ["demo", "scan", "manifest", "extract", "train", "evaluate"]
    assert "WARNING: " not in first, f"DVC warns about an output (an empty cache/faces, without data.faces): {first}"
    commit(repo, "baseline")

    assert ran(sh(repo, "dvc", "repro")) == ["scan"], "a second repro runs only the scan (which finds nothing new)"

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["C"] = [0.5, 5.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro")) == ["scan", "train", "evaluate"]
    card = json.loads((repo / "models" / "probe" / "card.json").read_text())
    assert card["C"] in (0.5, 5.0)
    # Extract depends on what of evaluate changes a row of the cache, not on the whole section.
    params["evaluate"]["bootstrap"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro")) == ["scan", "evaluate"]
    params["evaluate"]["robustness"] = {"jpeg": [50]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro"))[:2] == ["scan", "extract"], "a new robustness level is embedded"
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json"))
    assert "metrics/summary.json" in diff, "dvc metrics diff compares against the committed baseline"
    (shown,) = (v["data"] for v in json.loads(sh(repo, "dvc", "metrics", "show", "--json")).values())
    assert list(shown) == ["metrics/summary.json"], "one compact file is DVC's metrics; the detail is not listed"

    def leaves(d: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in d.values())

    summary = shown["metrics/summary.json"]["data"]
    assert summary["heldout"]["faceswap"]["auc"] is not None and "cross_auc" in summary["cross_manipulation"]
    assert leaves(summary) < 40, f"DVC lists a compact summary, not every detail ({leaves(summary)} numbers)"
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors") and set(plots["data"]) == {"roc", "layers", "robustness"}
    roc = plots["data"]["roc"][0]["content"]
    assert roc["encoding"]["color"]["field"] == "test_set", "one plot, one line per test set"
    assert {r["test_set"] for r in roc["data"]["values"]} == {"faceswap", "neuraltextures", "deepfakes", "face2face"}
    assert "loess" not in json.dumps(roc), "no smoothing"

    new = repo / "data" / "demo" / "Test_Fake" / "Deepfakes" / "900_901"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (72, 64), (200, 30 * i, 90)).save(new / f"{i:04d}.png")
    out = sh(repo, "dvc", "repro")
    assert ran(out)[:4] == ["demo", "scan", "manifest", "extract"], "demo only records the new images (persist)"
    assert "3 to embed" in out, "extract must embed only the new images"
    commit(repo, "more images")

    out = sh(repo, "dvc", "exp", "run", "-S", "train.probe=linear_svm")
    assert ran(out) == ["scan", "train", "evaluate"]
    assert json.loads((repo / "models" / "probe" / "card.json").read_text())["probe"] == "linear_svm"
    assert "linear_svm" in sh(repo, "dvc", "exp", "show", "--json"), "the experiment is recorded with its params"

    # compare: the committed baseline beside the experiment. `dvc exp run` left the experiment's
    # results in the workspace: they are listed once, under the experiment's name.
    table = sh(repo, sys.executable, "-m", "pipeline", "compare", "--resamples", "50")
    branch = sh(repo, "git", "rev-parse", "--abbrev-ref", "HEAD").strip()
    runs = {line.split()[0]: line.split()[-1] for line in table.split("\n\n")[0].splitlines()[1:]}
    assert len(runs) == 2 and runs.pop(branch) == "train.probe=logreg", table
    assert list(runs.values()) == ["train.probe=linear_svm"] and "workspace" not in runs, table
    commit(repo, "the experiment, kept")  # the branch now holds the experiment's results: one run
    table = sh(repo, sys.executable, "-m", "pipeline", "compare", "--resamples", "50")
    assert [line.split()[0] for line in table.split("\n\n")[0].splitlines()[1:]] == [branch], table


def test_queued_experiments_run_in_their_own_workspace(repo):
    """`dvc exp run --queue` runs each experiment in a temporary copy of the repo: the demo data
    must come with it (it is a DVC output), or every queued experiment fails."""
    sh(repo, "dvc", "repro")
    commit(repo, "baseline")
    for C in ("[0.5]", "[5.0]"):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.C={C}")
    sh(repo, "dvc", "exp", "run", "--run-all")
    status = sh(repo, "dvc", "queue", "status")
    assert status.count("Success") == 2 and "Failed" not in status, status
    shown = sh(repo, "dvc", "exp", "show", "--csv")
    assert "0.5" in shown and "5.0" in shown, "both experiments are recorded with their params"

    # One table of every run (the baseline commit + experiments) x test set, with paired significance.
    table = sh(repo, sys.executable, "-m", "pipeline", "compare", "--resamples", "200")
    names = [line.split()[0] for line in table.splitlines()[1:4]]
    # The workspace holds the baseline commit's results: listed once, under the branch's name.
    assert names[0] == sh(repo, "git", "rev-parse", "--abbrev-ref", "HEAD").strip() and len(set(names)) == 3, table
    # Each run says what sets it apart: the params that differ between the runs compared.
    assert table.splitlines()[0].split()[-1] == "differs", table
    swept = [line.split("train.C=")[-1] for line in table.splitlines()[1:4]]
    assert sorted(swept) == ["[0.01, 0.1, 1.0, 10.0]", "[0.5]", "[5.0]"], table
    for test_set in ("faceswap", "deepfakes"):
        block = table.split(f"\n{test_set}: ")[1].split("\n\n")[0].splitlines()[1:]
        assert len(block) == 3 and sum("best" in line for line in block) == 1, block
        for p in re.findall(r"p=([0-9.]+)", "\n".join(block)):
            assert 0.0 <= float(p) <= 1.0
    assert "paired bootstrap" in (repo / "reports" / "compare.html").read_text()


def test_an_experiment_workspace_reuses_the_face_detections(tmp_path):
    """A queued or `--temp` experiment runs in a fresh copy of the repo: git files and DVC outputs
    only. The face detections must be an output, or every experiment of a backbone sweep detects
    every frame again (hours of a CPU at FF++'s size). A teammate's `dvc pull` gets them too."""
    repo = copy_project(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["faces"] = {"detector": "dlib_hog", "size": 64, "no_face": "full_frame"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "face detection: 100%" in sh(repo, "dvc", "repro")
    commit(repo, "baseline")
    out = sh(repo, "dvc", "exp", "run", "--temp", "-S", "model.layers=[pooled]", "-S", "train.layer=pooled")
    assert "Running stage 'extract'" in out and "to embed" in out, out
    assert "face detection" not in out, "the experiment detected the faces again"


AUDIT_HOOK = """
import os, sys
_under, _log = os.environ["READS_UNDER"], os.environ["READS_LOG"]
def _log_reads(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".png"):
        path = os.path.abspath(args[0])
        if path.startswith(_under):
            with open(_log, "a") as fh:
                fh.write(path + "\\t" + " ".join(sys.argv[1:3]) + "\\n")
sys.addaudithook(_log_reads)
"""


def test_the_first_repro_reads_each_image_once(tmp_path, demo_images, monkeypatch):
    """Had the manifest depended on the data folder, DVC would hash the images before it runs and
    the manifest would hash them again: on 15 GB a second full pass. The scan stage reads each new
    image once and records the data's digest, which the manifest depends on instead; the manifest
    reuses what it knows (DVC must not delete it before the run). Every process that opens an
    image (DVC, each stage's Python) is logged by an audit hook."""
    repo = copy_project(tmp_path / "repo")
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    del pipeline["stages"]["demo"]  # a user's own data, as the README tells
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    data = repo / "data" / "demo"
    shutil.copytree(demo_images, data)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "reads.log"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hook"))
    monkeypatch.setenv("READS_UNDER", str(data.resolve()))
    monkeypatch.setenv("READS_LOG", str(log))
    site = tmp_path / "dvc-site"  # where DVC keeps its hash cache: emptied below
    sh(repo, "dvc", "config", "--local", "core.site_cache_dir", str(site))

    def reads(*cmd: str) -> tuple[Counter, dict]:
        """How often `cmd` opened each image, and how many opens each process made."""
        log.write_text("")
        sh(repo, *cmd)
        lines = [line.split("\t") for line in log.read_text().splitlines()]
        return Counter(path for path, _ in lines), dict(Counter(process for _, process in lines))

    images = [str(p.resolve()) for p in data.rglob("*.png")]
    first, by = reads("dvc", "repro", "manifest")
    assert len(images) > 100 and first == Counter(images), f"images opened, by process: {by}"
    again, by = reads("dvc", "repro", "manifest")
    assert not again, f"a repro with nothing new reads no image; opened by process: {by}"
    new = data / "Test_Fake" / "Deepfakes" / "900_901"
    new.mkdir()
    for i in range(2):
        Image.new("RGB", (72, 64), (200, 30 * i, 90)).save(new / f"{i:04d}.png")
    added, by = reads("dvc", "repro", "manifest")
    assert added == Counter(str(p.resolve()) for p in new.iterdir()), f"only the new, once: {by}"
    assert json.loads(sh(repo, "dvc", "status", "manifest", "--json")) == {}
    victim = new / "0000.png"
    victim.write_bytes(b"other bytes")
    shutil.rmtree(site)  # DVC's hash cache gone: DVC still reads no image (it never hashes them)
    changed, by = reads("dvc", "repro", "manifest")
    assert changed == Counter([str(victim.resolve())]), f"the changed file, once: {by}"
    rows = pq.read_table(repo / "cache" / "manifest.parquet", columns=["path", "digest"]).to_pylist()
    digest = next(r["digest"] for r in rows if r["path"].endswith("900_901/0000.png"))
    assert digest == hashlib.sha256(b"other bytes").hexdigest(), "the manifest reran on the change"


def test_a_stage_ends_with_the_dvc_that_ran_it(tmp_path):
    """`timeout 8h dvc repro`, `docker stop`, `kill <dvc>`: SIGTERM reaches DVC alone, which ends
    without stopping its stage (it leaves SIGINT to the stage, and SIGTERM to nobody). The extract
    ran on orphaned, writing into the cache and holding its lock while the user started again;
    in a container it was SIGKILLed at the teardown, losing what it had buffered. A stage now
    ends with the `dvc` that ran it, as on Ctrl-C: what is buffered is committed. DVC runs a
    stage's command in `$SHELL -c`, or `/bin/sh -c` where SHELL is unset (CI, cron, containers):
    bash hands its place to a one-command stage, while Debian's /bin/sh (dash) stays between
    and waits, and it outlives DVC too (a stage that watched its parent's end ran on). Here a
    shell stays between, whatever /bin/sh is."""
    import psutil

    repo = copy_project(tmp_path / "repo", shard_size=10_000)  # everything stays buffered until the end
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"]["extract"]["cmd"] += " && true"  # no shell runs the command in its own place
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    sh(repo, "dvc", "repro", "demo")
    env = {**paused_env(40), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dvc = subprocess.Popen(
        ["dvc", "repro", "extract"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_until_paused(dvc)
    (stage,) = [p for p in psutil.Process(dvc.pid).children(recursive=True) if p.cmdline()[1:4] == MODULE_EXTRACT]
    assert stage.ppid() != dvc.pid, "a shell stays between"
    dvc.send_signal(signal.SIGTERM)  # to DVC alone
    dvc.wait(timeout=60)
    try:
        stage.wait(timeout=60)
    except psutil.TimeoutExpired:
        stage.kill()
        raise AssertionError("the stage outlived the dvc that ran it") from None
    finally:
        dvc.communicate()  # the stage held DVC's output pipes
    (store,) = caches(repo / "cache" / "embeddings")
    assert store.count() == 32, "the two batches of 16 embedded before the pause were committed"


WATCHED_STAGE = """
import os, sys, time
if sys.argv[1] == "poll":
    del os.pidfd_open  # as on a kernel before 5.3 (RHEL 8's 4.18)
from pipeline.cli import Terminated, end_with_dvc, stop_on_sigterm
stop_on_sigterm()
try:
    end_with_dvc()
    time.sleep(1.5)
except Terminated:
    print("ended while DVC ran", flush=True)
    sys.exit()
print("watching", flush=True)
try:
    time.sleep(60)
except Terminated:
    print("terminated", flush=True)
"""

FAKE_DVC = """
import os, subprocess, sys
subprocess.Popen(["/bin/sh", "-c", sys.argv[1] + " && true"], env={**os.environ, "DVC_STAGE": "extract"})
sys.stdin.read()  # ends when the test closes stdin, leaving its shell and stage behind, as a killed DVC does
"""


@pytest.mark.parametrize("watch", ["pidfd", "poll", "dvc-is-pid-1"])
def test_a_stage_watches_dvc_through_the_shell_between(watch):
    """The mechanism of the test above, without DVC, each way a stage watches for DVC's end. And
    where DVC is process 1 (`docker run <image> dvc repro`), which the walk up from the stage
    meets last: the stage ran there until DVC ended, and not a moment after it started."""
    import shlex

    stage = shlex.join([sys.executable, "-c", WATCHED_STAGE, "poll" if watch == "poll" else "pidfd"])
    first = ["unshare", "--pid", "--fork", "--mount-proc"] if watch == "dvc-is-pid-1" else []
    if first and subprocess.run([*first, "true"], capture_output=True).returncode != 0:
        pytest.skip("no new process namespace here (unshare needs root, or user namespaces)")
    dvc = subprocess.Popen(
        [*first, sys.executable, "-c", FAKE_DVC, stage],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert select.select([dvc.stdout], [], [], 30)[0] and dvc.stdout.readline() == "watching\n"
    dvc.stdin.close()
    dvc.wait(timeout=10)
    if not first:  # (the end of a namespace's process 1 kills every process in it)
        assert dvc.stdout.read() == "terminated\n", "the stage ended when DVC did, not 60 s later"
