"""Data-parallel training over MPI (fastdl.distributed, issue 8).

The MPI tests launch real ranks on loopback: ``mpiexec -n 2 python worker.py``
(mpiexec from the ``mpich`` wheel of the ``test`` extra), each bounded by a
timeout. The in-process tests check the arithmetic without MPI.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fastdl as fd
from fastdl import distributed as D
from fastdl.datasets import load_digits

TIMEOUT = 60  # seconds for one mpiexec launch (each takes ~1-3 s here)


def find_mpiexec() -> str | None:
    """``mpiexec`` on PATH, else next to this interpreter (the mpich wheel's bin dir)."""
    candidates = [shutil.which("mpiexec"), str(Path(sys.executable).parent / "mpiexec"),
                  str(Path(sysconfig.get_path("scripts")) / "mpiexec")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[test]' installs it)"
    if find_mpiexec() is None:
        return "no mpiexec on PATH or next to sys.executable (the mpich wheel provides it)"
    return None


@pytest.fixture(scope="module")
def mpiexec():
    why = _mpi_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"distributed tests cannot run in CI: {why}")
        pytest.skip(why)
    return find_mpiexec()


WORKER = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    import fastdl as fd
    from fastdl import distributed as D
    from fastdl.datasets import load_digits

    cfg = json.loads(sys.argv[1])
    out = cfg["out"]
    comm = D.world()
    rank = comm.rank

    def data():
        X, y = load_digits()
        X = (X - X.mean(0)) / (X.std(0) + 1e-8)
        return X, y

    def model(bn=False, keep_prob=1.0, seed=3):
        layers = [fd.Dense(64, 32, use_bias=not bn)] + ([fd.BatchNorm(32)] if bn else []) + [fd.ReLU()]
        if keep_prob < 1:
            layers.append(fd.Dropout(keep_prob=keep_prob))
        layers.append(fd.Dense(32, 10))
        return fd.Sequential(layers, dtype="float64", backend="reference", seed=seed, l2=0.5)

    X, y = data()
    mode = cfg["mode"]
    if mode == "train":
        import fastdl.checkpoint as C
        saved = []
        real = C.save_checkpoint
        C.save_checkpoint = lambda *a, **k: (saved.append(rank), real(*a, **k))
        m = model(cfg["bn"], cfg.get("keep_prob", 1.0))
        if rank == 1:
            m.params[...] = 0  # overwritten by rank 0's broadcast
        t0 = time.perf_counter()
        h = m.fit(X, y, optimizer=fd.Adam(lr=3e-3), epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                  distributed=True, sync_batchnorm=cfg["sync"], validation_data=(X[:100], y[:100]),
                  checkpoint=os.path.join(out, "ckpt.npz"))
        np.savez(os.path.join(out, f"rank{rank}.npz"), params=m.params, state=m.state, loss=h["loss"],
                 val_loss=h["val_loss"], error=h["error"], batch_cost=h.batch_cost, saved=np.array(saved),
                 time=time.perf_counter() - t0)
    elif mode == "resume":
        import shutil

        ck, mid = os.path.join(out, "resume.npz"), os.path.join(out, "mid.npz")

        class Snapshot(fd.Callback):  # the checkpoint as a crash during epoch 3 would leave it (not finished)
            def on_epoch_end(self, model, epoch, logs):
                if rank == 0 and epoch == 2:
                    shutil.copyfile(ck, mid)

        a = model(bn=True, keep_prob=0.8)
        a.fit(X, y, optimizer=fd.Adam(lr=3e-3), epochs=4, batch_size=64, distributed=True, checkpoint=ck,
              callbacks=[Snapshot()])
        b = model(bn=True, keep_prob=0.8)
        b.params[...] += 1.0  # other initial values: rank 0 loads the checkpoint and broadcasts it
        b.fit(X, y, optimizer=fd.Adam(lr=3e-3), epochs=4, batch_size=64, distributed=True, checkpoint=mid,
              resume=True)
        c = model(bn=True, keep_prob=0.8)
        c.fit(X, y, optimizer=fd.Adam(lr=3e-3), epochs=4, batch_size=64, distributed=True)
        np.savez(os.path.join(out, f"rank{rank}.npz"), resumed=b.params, straight=c.params,
                 resumed_state=b.state, straight_state=c.state)
    elif mode == "fail":
        class Boom(fd.Callback):
            def on_epoch_end(self, model, epoch, logs):
                if rank == 1 and epoch == 1:
                    if cfg["how"] == "raise":
                        raise RuntimeError("simulated failure on rank 1")
                    time.sleep(600)  # stuck: only the collective timeout ends the job
        model().fit(X, y, epochs=1000, batch_size=32, distributed=True, callbacks=[Boom()])
        print("finished", rank, flush=True)
    elif mode == "stop":  # rank 1 is stopped (SIGSTOP) in the middle of training: it never answers anything
        import signal

        class Stop(fd.Callback):
            def on_epoch_end(self, model, epoch, logs):
                if rank == 1 and epoch == 1:
                    os.kill(os.getpid(), signal.SIGSTOP)
        if rank == 0:
            print(f"timeout {rank} {comm.timeout}", flush=True)
        model().fit(X, y, epochs=1000, batch_size=32, distributed=True, callbacks=[Stop()])
        print("finished", rank, flush=True)
    elif mode == "stop_object":  # the root of an object broadcast is stopped (a root does not wait for others)
        import signal

        if rank == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        print("got", comm.bcast_object({"rank0": "hello"}), flush=True)
    elif mode == "objects":  # object broadcasts and barriers with the timeout machinery give the same results
        comm.barrier()
        obj = comm.bcast_object({"x": [1, 2.5, "z"], "arr": np.arange(3)} if rank == 0 else None)
        big = comm.bcast_object(bytes(range(256)) * 5000 if rank == 0 else None)
        comm.barrier()
        # one write per line: print(a, b, ...) writes the pieces separately and the ranks' pieces interleave
        print(f"objects {rank} {obj['x']} {obj['arr'].tolist()} {len(big)} {big[:3] == bytes([0, 1, 2])}",
              flush=True)
    elif mode == "mismatch":
        if rank == 1:
            X, y = X[:-1], y[:-1]
        try:
            model().fit(X, y, epochs=2, batch_size=32, distributed=True)
        except ValueError as exc:
            print(f"rank {rank} ValueError: {exc}", flush=True)
            sys.exit(3)
''')


def run_mpi(mpiexec, tmp_path, n=2, timeout=TIMEOUT, env=None, **cfg):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg.setdefault("out", str(tmp_path))
    import json
    import signal

    full_env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                    PYTHONUNBUFFERED="1", **(env or {}))
    if env is None or "FASTDL_MPI_TIMEOUT" not in env:
        full_env.pop("FASTDL_MPI_TIMEOUT", None)
    t0 = time.perf_counter()
    # own session: if the job hangs (e.g. a SIGSTOPped rank), kill every process of it, not only mpiexec
    proc = subprocess.Popen([mpiexec, "-n", str(n), sys.executable, str(script), json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the MPI job did not end within {timeout} s\n{out[-2000:]}\n{err[-3000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers (a stopped rank that the launcher missed)
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.elapsed = time.perf_counter() - t0
    return result


def single_process(bn: bool, batch_size: int, epochs: int):
    """The same training in this process, without MPI, with the global batch."""
    X, y = load_digits()
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    layers = [fd.Dense(64, 32, use_bias=not bn)] + ([fd.BatchNorm(32)] if bn else []) + [fd.ReLU(),
                                                                                          fd.Dense(32, 10)]
    m = fd.Sequential(layers, dtype="float64", backend="reference", seed=3, l2=0.5)
    h = m.fit(X, y, optimizer=fd.Adam(lr=3e-3), epochs=epochs, batch_size=batch_size,
              validation_data=(X[:100], y[:100]))
    return m, h


# --------------------------------------------------------------------------------------- MPI: equivalence


@pytest.mark.parametrize("bn, batch_size", [
    (False, 64),    # 1797 = 14 x 128 + 5: the short last batch splits 2/3 over the ranks
    (True, 64),     # synchronised BatchNorm
    (True, 449),    # global batch 898: the last batch has ONE row, so rank 0's shard is empty
], ids=["dense", "sync-bn", "sync-bn-empty-shard"])
def test_two_ranks_equal_one_process_with_the_global_batch(mpiexec, tmp_path, bn, batch_size):
    epochs = 4
    proc = run_mpi(mpiexec, tmp_path, mode="train", bn=bn, sync=True, batch_size=batch_size, epochs=epochs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    # every rank holds bit-identical parameters, statistics and logs
    for k in ("params", "state", "loss", "val_loss", "error", "batch_cost"):
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    ref, h = single_process(bn, 2 * batch_size, epochs)
    np.testing.assert_allclose(r0["params"], ref.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r0["state"], ref.state, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r0["loss"], h["loss"], rtol=1e-10)
    np.testing.assert_allclose(r0["val_loss"], h["val_loss"], rtol=1e-10)
    np.testing.assert_array_equal(r0["error"], h["error"])
    np.testing.assert_allclose(r0["batch_cost"], h.batch_cost, rtol=1e-10)
    # only rank 0 checkpointed
    assert list(r0["saved"]) == [0] * epochs and list(r1["saved"]) == []
    assert proc.elapsed < 30


def test_per_rank_batchnorm_differs_but_ranks_agree(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="train", bn=True, sync=False, batch_size=64, epochs=2, keep_prob=0.8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    np.testing.assert_array_equal(r0["params"], r1["params"])
    np.testing.assert_array_equal(r0["state"], r1["state"])  # running averages are averaged over ranks
    ref, _ = single_process(True, 128, 2)
    assert not np.allclose(r0["params"], ref.params, atol=1e-6)  # per-rank statistics (and dropout) differ
    # reproducible: the same launch again gives the same bits (dropout streams are keyed by seed and rank)
    first = r0["params"].copy()
    proc = run_mpi(mpiexec, tmp_path, mode="train", bn=True, sync=False, batch_size=64, epochs=2, keep_prob=0.8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npz")["params"], first)


def test_resume_from_checkpoint_matches_uninterrupted_run(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        z = np.load(tmp_path / f"rank{r}.npz")
        np.testing.assert_array_equal(z["resumed"], z["straight"])
        np.testing.assert_array_equal(z["resumed_state"], z["straight_state"])


# --------------------------------------------------------------------------------------- MPI: failures


def test_a_failing_rank_aborts_the_whole_job(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="fail", how="raise", timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "simulated failure on rank 1" in proc.stderr
    assert "rank 1 of 2 failed with RuntimeError" in proc.stderr
    assert "finished" not in proc.stdout
    assert proc.elapsed < 30


def test_a_stuck_rank_is_aborted_by_the_collective_timeout(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="fail", how="stuck", env={"FASTDL_MPI_TIMEOUT": "2"})
    assert proc.returncode != 0
    assert "rank 0/2: all-reduce #" in proc.stderr
    assert "did not complete within 2 s (FASTDL_MPI_TIMEOUT" in proc.stderr
    assert "rank 1 did not answer a heartbeat" in proc.stderr  # busy in its callback, outside any collective
    assert proc.elapsed < 30


def test_a_stopped_rank_is_named_after_the_timeout(mpiexec, tmp_path):
    """Issue 14.8: a SIGSTOPped rank used to hang the job forever; now the timeout names it."""
    proc = run_mpi(mpiexec, tmp_path, mode="stop", env={"FASTDL_MPI_TIMEOUT": "3"})
    assert proc.returncode != 0
    assert "finished" not in proc.stdout
    assert "timeout 0 3.0" in proc.stdout
    assert "did not complete within 3 s" in proc.stderr
    assert "rank 1 did not answer a heartbeat within 1 s (stopped, dead" in proc.stderr, proc.stderr[-3000:]
    assert proc.elapsed < 40


def test_object_broadcasts_have_the_timeout_too(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="stop_object", env={"FASTDL_MPI_TIMEOUT": "2"})
    assert proc.returncode != 0
    assert "rank 1/2: object broadcast #1 of 8 bytes did not complete within 2 s" in proc.stderr, proc.stderr[-3000:]
    assert "rank 0 did not answer" in proc.stderr
    assert proc.elapsed < 40


@pytest.mark.parametrize("timeout", ["5", "0"])
def test_object_broadcasts_and_barriers_work_with_and_without_the_timeout(mpiexec, tmp_path, timeout):
    proc = run_mpi(mpiexec, tmp_path, mode="objects", env={"FASTDL_MPI_TIMEOUT": timeout})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert f"objects {r} [1, 2.5, 'z'] [0, 1, 2] 1280000 True" in proc.stdout


def test_the_default_timeout_is_30_minutes_and_configurable(monkeypatch):
    monkeypatch.delenv("FASTDL_MPI_TIMEOUT", raising=False)
    assert D.DEFAULT_TIMEOUT == 1800 and D.resolve_timeout() == 1800
    assert D.resolve_timeout(0) is None and D.resolve_timeout(2.5) == 2.5 and D.resolve_timeout(math.inf) is None
    monkeypatch.setenv("FASTDL_MPI_TIMEOUT", "20")
    assert D.resolve_timeout() == 20 and D.resolve_timeout(7) == 7  # the parameter wins
    monkeypatch.setenv("FASTDL_MPI_TIMEOUT", "0")
    assert D.resolve_timeout() is None
    monkeypatch.setenv("FASTDL_MPI_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="FASTDL_MPI_TIMEOUT must be a number of seconds.*'ten'"):
        D.resolve_timeout()
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            D.resolve_timeout(bad)


def test_ranks_with_different_data_get_a_clear_error_on_every_rank(mpiexec, tmp_path):
    proc = run_mpi(mpiexec, tmp_path, mode="mismatch")
    assert proc.returncode != 0
    for r in (0, 1):
        assert f"rank {r} ValueError: fastdl.distributed: the 2 ranks disagree on n_examples" in proc.stdout


def test_cli_distributed_prints_and_saves_on_rank_0_only(mpiexec, tmp_path):
    path = tmp_path / "model.npz"
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "fastdl", "train", "--distributed",
                           "--sync-batchnorm", "--epochs", "2", "--batch-size", "32", "--backend", "reference",
                           "--verbose", "2", "--save", str(path)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("data: digits") == 1 and out.count("epoch 2/2") == 1
    assert out.count("saved model to") == 1 and "2 ranks x batch 32" in out
    assert path.is_file()
    assert fd.load(path).params.size == 17418


# --------------------------------------------------------------------------------------- in-process


def _digits(m=300):
    X, y = load_digits()
    X = ((X - X.mean(0)) / (X.std(0) + 1e-8))[:m]
    return X, y[:m]


def _model(bn=False, keep_prob=1.0, l2=0.3, dtype="float64"):
    layers = [fd.Dense(64, 16, use_bias=not bn)] + ([fd.BatchNorm(16)] if bn else []) + [fd.ReLU()]
    if keep_prob < 1:
        layers.append(fd.Dropout(keep_prob=keep_prob))
    return fd.Sequential(layers + [fd.Dense(16, 10)], dtype=dtype, backend="reference", seed=1, l2=l2)


def test_weighted_shard_gradients_sum_to_the_global_gradient():
    """grad_scale = m_r/M and m_l2 = M per shard: the SUM over unequal shards is the global gradient (L2 too)."""
    X, y = _digits(37)
    model = _model()
    model._loss_and_grads(X, y, dropout=False, n_total=None, step=0)
    full = model.grads.copy()
    total = np.zeros_like(full)
    for lo, hi in (D.shard(0, 37, r, 3) for r in range(3)):
        model._loss_and_grads(X[lo:hi], y[lo:hi], dropout=False, n_total=None, step=0, m_l2=37,
                              grad_scale=(hi - lo) / 37)
        total += model.grads
    np.testing.assert_allclose(total, full, rtol=1e-12, atol=1e-15)


def test_sync_batchnorm_path_on_one_process_equals_the_kernels():
    X, y = _digits(50)
    a, b = _model(bn=True), _model(bn=True)
    la, _, _ = a._loss_and_grads(X, y, dropout=False, n_total=None, step=0)
    lb, _, _ = b._loss_and_grads(X, y, dropout=False, n_total=None, step=0, comm=D.Communicator())
    assert la == pytest.approx(lb, rel=1e-13)
    np.testing.assert_allclose(b.grads, a.grads, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(b.state, a.state, rtol=1e-12, atol=1e-14)


def test_sync_batchnorm_float32_stays_accurate():
    X, y = _digits(64)
    X = X + 1000.0  # large mean: the shifted sums avoid cancellation
    a, b = _model(bn=True, dtype="float32"), _model(bn=True, dtype="float32")
    for model in (a, b):
        model.layers[1].running_mean[...] = 0
    a._loss_and_grads(a.check_X(X), y, dropout=False, n_total=None, step=0)
    b._loss_and_grads(b.check_X(X), y, dropout=False, n_total=None, step=0, comm=D.Communicator())
    np.testing.assert_allclose(b.grads, a.grads, rtol=2e-3, atol=2e-5)


def test_one_rank_distributed_fit_equals_plain_fit_bitwise():
    X, y = _digits()
    a, b = _model(bn=True, keep_prob=0.8), _model(bn=True, keep_prob=0.8)
    ha = a.fit(X, y, epochs=2, batch_size=32, validation_data=(X[:50], y[:50]))
    hb = b.fit(X, y, epochs=2, batch_size=32, validation_data=(X[:50], y[:50]), distributed=D.Communicator(),
               sync_batchnorm=True)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert ha.history["loss"] == pytest.approx(hb.history["loss"], rel=1e-14)
    assert ha.history["val_loss"] == pytest.approx(hb.history["val_loss"], rel=1e-14)


def test_rank_seeds_and_shards():
    assert D.rank_seed(7, 0) == 7
    seeds = {D.rank_seed(7, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2 ** 63 for s in seeds)
    assert D.rank_seed(7, 3) == D.rank_seed(7, 3) != D.rank_seed(8, 3)
    assert [D.shard(10, 15, r, 2) for r in range(2)] == [(10, 12), (12, 15)]
    assert [D.shard(0, 1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
    assert [D.shard(0, 128, r, 2) for r in range(2)] == [(0, 64), (64, 128)]


def test_distributed_argument_is_validated():
    X, y = _digits(40)
    with pytest.raises(TypeError, match="distributed must be"):
        _model().fit(X, y, epochs=1, distributed="yes")
    assert D.get_communicator(False) is None and D.get_communicator(None) is None


class _FakeGroup(D.Communicator):
    def __init__(self, size):
        self.size = size


def test_threads_per_rank_shares_the_node_unless_the_user_chose(monkeypatch):
    for v in D._THREAD_VARS + D._LOCAL_SIZE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert D.threads_per_rank(_FakeGroup(4)) is None  # the launcher does not say how many ranks share the node
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    assert D.threads_per_rank(_FakeGroup(4)) == 2
    assert D.threads_per_rank(_FakeGroup(1)) is None
    monkeypatch.setenv("MPI_LOCALNRANKS", "16")
    assert D.threads_per_rank(_FakeGroup(16)) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert D.threads_per_rank(_FakeGroup(16)) is None
