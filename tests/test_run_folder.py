"""The run folder on both backends, through the real CLI: one run at a time (an OS lock), a finished
run left alone, resume that refuses another run or backend and applies changed settings as a fresh
run with them would, damaged checkpoints skipped, --overwrite that removes only what runs wrote,
unwritable folders and a full disk as one line."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import error_line, run

from mlxrl.integrity import checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "configs/quickstart/dpo.yaml")
PAIRS = ROOT / "configs/quickstart/data/preferences.jsonl"
BACKENDS = ["mlx", "torch"]
WEIGHTS = {"mlx": "adapters.safetensors", "torch": "adapter_model.safetensors"}


def train(backend, out, *extra, data=PAIRS):
    return run("train", "--backend", backend, "-c", DPO, "--data.train.datasets[0].dataset_name", data,
               "--training.output_dir", out, "--training.max_steps", "4", "--training.save_steps", "2",
               "--training.logging_steps", "1", *extra)


def learning_rates(out: Path) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module", params=BACKENDS)
def finished(request, tmp_path_factory):
    """(backend, a finished 4-step run with checkpoints 2 and 4); its data holds 3 pairs whose
    chosen equals rejected, which the run drops with a count."""
    root = tmp_path_factory.mktemp(f"finished-{request.param}")
    rows = PAIRS.read_text().splitlines()
    same = json.loads(rows[0]) | {"rejected": json.loads(rows[0])["chosen"]}
    data = root / "pairs.jsonl"
    data.write_text("\n".join(rows + [json.dumps(same)] * 3) + "\n")
    result = train(request.param, root / "run", data=data)
    assert result.exit_code == 0, result.output
    assert f"warning: 3 of {len(rows) + 3} pairs dropped: chosen equals rejected" in result.stderr
    return request.param, root / "run", data


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def test_a_finished_run_is_left_alone_and_says_so(finished, tmp_path):
    backend, straight, data = finished
    out = copy_of(straight, tmp_path)
    def files():
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.name != ".mlxrl.lock"}

    before = files()
    for extra in ([], ["--resume"]):  # torch used to train a 5th step on --resume
        result = train(backend, out, *extra, data=data)
        assert result.exit_code == 0, result.output
        assert "holds a finished dpo run" in result.stderr and "--overwrite" in result.stderr
    assert files() == before


def test_resume_refuses_another_run_and_another_backend(finished, tmp_path):
    backend, straight, data = finished
    out = copy_of(straight, tmp_path)
    for name in ("trainer_state.json", "mlxrl_run.json", "checkpoint-4"):  # unfinished: checkpoint-2
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    line = error_line(train(backend, out, "--resume", "--peft.lora_r", "16", "--model.model_name",
                            "tiny://llama", "--training.trainer_type", "TRL_SFT", data=data))
    assert "is another run" in line
    assert all(k in line for k in ("peft.lora_r 8 -> 16", "model.model_name tiny://qwen2 -> tiny://llama",
                                   "training.method dpo -> sft"))
    other = {"mlx": "torch", "torch": "mlx"}[backend]
    line = error_line(train(other, out, "--resume", data=data))
    assert f"written by the {'MLX' if backend == 'mlx' else 'torch'} backend" in line
    assert f"--backend {backend}" in line
    line = error_line(train(backend, out, data=data))  # no --resume: points to it
    assert "unfinished run" in line and "--resume" in line


DAMAGE = ("truncated-adapter", "truncated-optimizer", "garbled-state", "only-config")


def damage(folder: Path, kind: str, backend: str) -> None:
    if kind == "garbled-state":
        (folder / "trainer_state.json").write_text('{"global_st')
    elif kind == "only-config":
        for path in folder.iterdir():
            if path.name != "adapter_config.json":
                path.unlink()
    else:
        path = folder / (WEIGHTS[backend] if kind == "truncated-adapter" else "optimizer.safetensors")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("kind", DAMAGE)
def test_no_readable_checkpoint_is_one_line(finished, kind, tmp_path):
    backend, straight, data = finished
    out = copy_of(straight, tmp_path)
    for step in (2, 4):
        damage(out / f"checkpoint-{step}", kind, backend)
    line = error_line(train(backend, out, "--resume", "--training.max_steps", "6", data=data))
    assert "no complete and readable checkpoint" in line and "checkpoint-4:" in line and "checkpoint-2:" in line


def test_resume_skips_a_damaged_checkpoint_and_applies_new_settings(finished, tmp_path):
    """The resumed run's learning rate from step 3 on is a fresh run's with the new settings
    (torch used to keep the checkpoint's), on both backends."""
    backend, straight, data = finished
    out = copy_of(straight, tmp_path)
    damage(out / "checkpoint-4", {"mlx": "truncated-adapter", "torch": "truncated-optimizer"}[backend], backend)
    new = ["--training.max_steps", "6", "--training.learning_rate", "1e-3", "--training.lr_scheduler_type", "linear"]
    result = train(backend, out, "--resume", *new, data=data)
    assert result.exit_code == 0, result.output
    assert "skipping damaged checkpoints (checkpoint-4: " in result.stderr
    assert "resumed from" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    assert "training.learning_rate 0.005 -> 0.001" in result.stderr and "training.max_steps 4 -> 6" in result.stderr
    fresh = tmp_path / "fresh"
    assert train(backend, fresh, *new, data=data).exit_code == 0
    resumed, reference = learning_rates(out), learning_rates(fresh)
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(3, 7)] == pytest.approx([reference[s] for s in range(3, 7)], rel=1e-6)


def test_overwrite_removes_what_runs_wrote_and_keeps_the_rest(finished, tmp_path):
    """The other backend's run replaces this one: a torch run's README.md model card and
    tokenizer files do not outlive --overwrite, nor an MLX run's adapters.safetensors."""
    first, straight, data = finished
    second = {"mlx": "torch", "torch": "mlx"}[first]
    out = copy_of(straight, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    result = train(second, out, "--overwrite", "--training.max_steps", "2", data=data)
    assert result.exit_code == 0, result.output
    assert "kept what mlxrl did not write there: notes.txt, plots/" in result.stderr
    record = json.loads((out / "mlxrl_run.json").read_text())
    assert record["backend"] == second
    left = {p.name for p in out.iterdir()}
    assert left == {".mlxrl.lock", "notes.txt", "plots", "metrics.jsonl", "checkpoint-2", "runs", *record["files"]}
    assert len(list((out / "runs").iterdir())) == 1  # the new run's TensorBoard logs alone
    assert WEIGHTS[first] not in left and (first != "torch" or "README.md" not in left)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dir_that_is_a_file_or_not_writable(backend, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file, not a folder" in error_line(train(backend, afile))
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes through file modes; an immutable folder stops it too
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        locked.chmod(0o555)
    try:
        assert "is not writable" in error_line(train(backend, locked))
        assert "cannot create training.output_dir" in error_line(train(backend, locked / "sub"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


def _holder(out: Path) -> subprocess.Popen:
    """A real MLX run on `out`, long enough to be stopped and watched."""
    proc = subprocess.Popen([sys.executable, "-m", "mlxrl.cli", "train", "--backend", "mlx", "-c", DPO,
                             "--data.train.datasets[0].dataset_name", str(PAIRS), "--training.output_dir",
                             str(out), "--training.max_steps", "5000", "--training.save_steps", "0",
                             "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    return proc


def test_one_run_per_folder_even_asleep_and_no_stale_lock(tmp_path):
    """A run stopped as a laptop sleeps (SIGSTOP) still holds its folder; woken (SIGCONT) it goes
    on and stops cleanly; a SIGKILLed run leaves no lock behind."""
    out = tmp_path / "run"
    proc = _holder(out)
    proc.send_signal(signal.SIGSTOP)
    try:
        for backend in BACKENDS:
            line = error_line(train(backend, out, "--resume"))
            assert f"is in use by another run (pid {proc.pid} on " in line and "--training.max_steps 5000" in line
    finally:
        proc.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "SIGINT at step" in err, err
    killed = tmp_path / "killed"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mlxrl.run_lock import RunLock\n"
                               "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
                               str(killed)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a run killed before its first checkpoint
    assert "is in use by another run" in error_line(train("mlx", killed))
    holder.kill()
    holder.wait()
    result = train("mlx", killed, "--training.max_steps", "1")
    assert result.exit_code == 0, result.output
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing
    return apply


def test_a_failed_checkpoint_write_keeps_the_last_one(finished, tmp_path):
    """A real write failure (the file-size limit makes the libraries' own writers fail as a full
    disk does): one line, the previous checkpoint intact, no staging folder left."""
    backend, straight, data = finished
    out = copy_of(straight, tmp_path)
    optimizer = (out / "checkpoint-4" / "optimizer.safetensors").stat().st_size
    cmd = [sys.executable, "-m", "mlxrl.cli", "train", "--backend", backend, "-c", DPO,
           "--data.train.datasets[0].dataset_name", str(data), "--training.output_dir", str(out),
           "--training.max_steps", "6", "--training.save_steps", "2", "--training.logging_steps", "1",
           "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(optimizer // 2))
    assert proc.returncode == 1, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "could not save checkpoint-6" in line[0] and "checkpoint-4 is intact" in line[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert checkpoint_problem(out / "checkpoint-4") is None
