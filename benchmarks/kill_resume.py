"""Kill training with SIGKILL again and again (most kills inside a checkpoint write), resume.

Trains ``python -m minivlmoe train --preset tiny`` with a checkpoint every ``--eval-every``
steps, SIGKILLs it ``--kills`` times and continues it with ``--resume`` after each kill,
then checks what issue 11 asks of a crash-safe run folder:

* every kill left a loadable checkpoint, never older than the one before (0 lost);
* no temporary file is left in the run folder once the run is finished (0 left);
* the final metrics.jsonl (``elapsed_s`` aside) and the final checkpoint (parameters,
  AdamW state, generator state, data position) are bit-identical to an uninterrupted
  run with the same seed;
* no stderr of any process holds a traceback.

Every other kill is aimed at a checkpoint write: the script polls the run folder for the
checkpoint's temporary file (``.ckpt.npz.<hex>.tmp``) and kills when one appears after
one or two completed saves of the process (so each such cycle still saves a checkpoint
and the run moves on).  The other kills come at a random time, which puts
some of them in the startup of a resume (e.g. while metrics.jsonl is being rewritten).
A kill counts as "inside a write" only if its temporary file is still there after the
process died.  One summary line; exit status 0 only if every check holds:

    OPENBLAS_NUM_THREADS=1 python benchmarks/kill_resume.py --kills 20

tests/test_crash_safety.py runs the same loop with 3 kills.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)      # the checkout this script belongs to (as its children run)
CKPT_TEMP = re.compile(r"\.ckpt\.npz\.[0-9a-f]{12}\.tmp")
POLL_S = 0.0005


def _start(run_dir, log_path, steps, eval_every, seed, resume, dtype="float32"):
    cmd = [sys.executable, "-m", "minivlmoe", "train", "--out", run_dir, "--quiet"]
    if resume:
        cmd.append("--resume")
    else:
        cmd += ["--preset", "tiny", "--steps", str(steps), "--eval-every", str(eval_every),
                "--seed", str(seed), "--dtype", dtype, "--overwrite"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    log.close()
    return proc


def _ckpt_temps(run_dir):
    try:
        return {e.name for e in os.scandir(run_dir) if CKPT_TEMP.fullmatch(e.name)}
    except FileNotFoundError:
        return set()


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _wait_and_kill(proc, run_dir, *, saves=None, deadline_s=None):
    """Kill ``proc`` when a checkpoint temp file appears after ``saves - 1`` completed
    saves (or, should the polling miss every temp file on a fast disk, right after the
    ``saves + 2``-th save), or after ``deadline_s`` seconds; True once it is dead, None
    if it exited by itself."""
    ckpt, t0 = os.path.join(run_dir, "ckpt.npz"), time.perf_counter()
    inode, completed = _inode(ckpt), 0
    while proc.poll() is None:
        if saves is not None:
            now = _inode(ckpt)
            completed += now != inode             # each os.replace gives a new inode
            inode = now
            fire = ((completed >= saves - 1 and _ckpt_temps(run_dir))
                    or completed >= saves + 2)
        else:
            fire = time.perf_counter() - t0 >= deadline_s
        if fire:
            proc.kill()                                          # SIGKILL on POSIX
            proc.wait()
            return True
        time.sleep(POLL_S)
    return None


def _same_trees(a, b):
    """Number of leaves compared if ``a`` and ``b`` are bit-identical trees, else None."""
    from minivlmoe.tree import flatten

    fa, fb = flatten(a), flatten(b)
    if fa.keys() != fb.keys():
        return None
    for k in fa:
        x, y = fa[k], fb[k]
        parts = (("data", "indices", "indptr") if hasattr(x, "indptr") else (None,))
        for p in parts:
            u, v = (np.asarray(x), np.asarray(y)) if p is None else (getattr(x, p),
                                                                      getattr(y, p))
            if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
                return None
    return len(fa)


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def compare_runs(a, b):
    """(identical, detail): metrics.jsonl and ckpt.npz of run folders ``a`` and ``b``."""
    from minivlmoe import run_checkpoint, run_folder

    ma, mb = run_folder.read_metrics(a), run_folder.read_metrics(b)
    if _without_time(ma) != _without_time(mb):
        return False, f"metrics differ ({len(ma)} vs {len(mb)} records)"
    ca = run_checkpoint.load_checkpoint(os.path.join(a, run_folder.CKPT_NAME))[0]
    cb = run_checkpoint.load_checkpoint(os.path.join(b, run_folder.CKPT_NAME))[0]
    leaves = [_same_trees(ca.params, cb.params), _same_trees(ca.opt_state, cb.opt_state)]
    if None in leaves:
        return False, "final parameters or optimizer state differ"
    ea, eb = dict(ca.extra), dict(cb.extra)
    ea.pop("elapsed_s", None)
    eb.pop("elapsed_s", None)
    if (ca.step, ca.rng_state, ea) != (cb.step, cb.rng_state, eb):
        return False, "final step, generator state or data position differ"
    return True, f"{len(ma)} records, {sum(leaves)} arrays"


def run(kills=20, *, steps=600, eval_every=2, seed=0, dtype="float32", kill_seed=0,
        max_delay_s=2.0, workdir=None):
    """The kill-resume loop; returns a dict of counts (see the module docstring)."""
    from minivlmoe import checkpoint, run_checkpoint, run_folder

    rng = random.Random(kill_seed)
    own = workdir is None
    workdir = tempfile.mkdtemp(prefix="kill_resume_") if own else workdir
    run_dir, ref_dir = os.path.join(workdir, "run"), os.path.join(workdir, "ref")
    logs = []

    def log_path():
        logs.append(os.path.join(workdir, f"stderr_{len(logs):03d}.txt"))
        return logs[-1]

    ref = _start(ref_dir, log_path(), steps, eval_every, seed, resume=False, dtype=dtype)
    ckpt_path = os.path.join(run_dir, run_folder.CKPT_NAME)
    proc = _start(run_dir, log_path(), steps, eval_every, seed, resume=False, dtype=dtype)
    while proc.poll() is None and not os.path.exists(ckpt_path):
        time.sleep(POLL_S)          # arm the kills once the first checkpoint exists
    done = {"kills": 0, "in_save": 0, "temps_left_by_kills": 0, "lost": 0, "failures": 0}
    last_step = -1
    while done["kills"] < kills:
        if done["kills"] % 2 == 0:                # aimed at a checkpoint write
            killed = _wait_and_kill(proc, run_dir, saves=rng.choice((2, 3)))
        else:                                     # at a random moment
            killed = _wait_and_kill(proc, run_dir, deadline_s=rng.uniform(0.05, max_delay_s))
        if killed is None:                        # it exited by itself
            done["failures"] += proc.returncode != 0
            break
        done["kills"] += 1
        temps = _ckpt_temps(run_dir)
        done["in_save"] += bool(temps)
        done["temps_left_by_kills"] += len(temps)
        try:
            step = run_checkpoint.load_checkpoint(ckpt_path)[0].step
            if step < last_step:
                raise checkpoint.CheckpointError(f"step {step} < {last_step}")
            last_step = step
        except (checkpoint.CheckpointError, OSError):
            done["lost"] += 1
        proc = _start(run_dir, log_path(), steps, eval_every, seed, resume=True)
    else:
        proc.wait()                               # the last resume runs to the end
        done["failures"] += proc.returncode != 0
    ref.wait()
    done["failures"] += ref.returncode != 0
    left = [e.name for e in os.scandir(run_dir) if e.name.endswith(".tmp")]
    identical, detail = compare_runs(run_dir, ref_dir) if not done["failures"] else (
        False, "a process failed")
    tracebacks = sum("Traceback" in open(p, encoding="utf-8", errors="replace").read()
                     for p in logs)
    result = {**done, "temps_left": len(left), "identical": identical, "detail": detail,
              "tracebacks": tracebacks, "processes": len(logs), "workdir": workdir}
    result["ok"] = (done["kills"] == kills and not done["lost"] and not done["failures"]
                    and not left and identical and not tracebacks)
    if own and result["ok"]:
        shutil.rmtree(workdir)                    # kept for a look when a check failed
    return result


def summary(r):
    return (f"kill_resume: {r['kills']} kills ({r['in_save']} inside a checkpoint write, "
            f"{r['temps_left_by_kills']} temp files left by them), {r['lost']} checkpoints "
            f"lost, {r['temps_left']} temp files left after the resumes, final metrics and "
            f"checkpoint bit-identical to the uninterrupted run: "
            f"{'yes' if r['identical'] else 'NO'} ({r['detail']}), {r['tracebacks']} "
            f"tracebacks in {r['processes']} stderr, {r['failures']} failed processes"
            f" -> {'OK' if r['ok'] else 'FAILED'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs (20)")
    p.add_argument("--steps", type=int, default=600, help="training steps (600: enough for 20 kills to land before the run ends)")
    p.add_argument("--eval-every", type=int, default=2, help="steps between checkpoints (2)")
    p.add_argument("--seed", type=int, default=0, help="training seed (0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--kill-seed", type=int, default=0, help="seed of the kill times (0)")
    p.add_argument("--workdir", help="keep the run folders here (default: a temp folder)")
    args = p.parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    r = run(args.kills, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
            dtype=args.dtype, kill_seed=args.kill_seed, workdir=args.workdir)
    print(summary(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
