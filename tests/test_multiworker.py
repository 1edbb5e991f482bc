"""Multi-process tf.distribute on localhost: MultiWorkerMirrored and PS.

Each test module fixture starts its own processes on free loopback ports,
runs them to completion and always kills their process groups afterwards
(also when a process fails or hangs). Strategies run in child processes:
the pytest process has four logical CPU devices (conftest.py), which would
change what a strategy sees.

- MultiWorkerMirroredStrategy (`_multiworker_worker.py`): two workers train
  `HistoryTwoTower` + `SampledRetrieval(global_negatives=True)` and `SASRec`
  + `NextItemTask(SampledSoftmax)` with fixed candidates, worker w on slice
  w of every global batch; a third process trains the same models on the
  whole global batches without a strategy.
- ParameterServerStrategy (`_ps_cluster.py`): a chief, two workers and two
  parameter servers; every variable (the item table included) is split in
  two by `FixedShardsPartitioner(2)`; `model.fit` trains `SASRec` with a
  fused `CCEMinus` loss, then every tfrec_fast loss runs on a worker with
  the sharded item table.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
RUN_TIMEOUT_S = 200  # a generous cap; a normal run takes a few seconds
LOG_TAIL_CHARS = 4000


def _free_ports(count):
    """`count` distinct free loopback ports (all bound at once, then freed)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(
                   p for p in (REPO_DIR, env.get("PYTHONPATH")) if p))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


class _Processes:
    """Child processes, each in its own session (process group), logged to
    files; `close` kills every group, also on failure."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = {}

    def start(self, name, args, env):
        with open(os.path.join(self.log_dir, f"{name}.log"), "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable] + args, cwd=REPO_DIR, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name):
        with open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
            return f.read().decode(errors="replace")[-LOG_TAIL_CHARS:]

    def wait(self, names, timeout):
        """Waits for `names` to exit; fails on a timeout or a bad exit.

        A process that fails ends the wait at once: its peers may wait for
        it forever (collectives, remote calls).
        """
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            for name in list(pending):
                code = self.procs[name].poll()
                if code is None:
                    continue
                pending.remove(name)
                if code != 0:
                    pytest.fail(f"{name} exited with {code}:\n"
                                f"{self.log(name)}")
            if pending and time.monotonic() > deadline:
                pytest.fail(f"{pending} still running after {timeout} s:\n" +
                            "\n".join(f"--- {n}\n{self.log(n)}"
                                      for n in pending))
            time.sleep(0.2)

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            proc.wait(timeout=30)


# ------------------------------------------------ MultiWorkerMirroredStrategy

MODELS = ("two_tower", "sasrec")


@pytest.fixture(scope="module")
def multiworker_run(tmp_path_factory):
    """Runs 2 MWMS workers and the single-process reference; loads outputs."""
    out = tmp_path_factory.mktemp("multiworker")
    script = os.path.join(TESTS_DIR, "_multiworker_worker.py")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = _Processes(str(out))
    try:
        for index in range(2):
            procs.start(f"worker{index}", [script, "worker", str(out)],
                        _child_env({"cluster": cluster, "task": {
                            "type": "worker", "index": index}}))
        procs.start("single", [script, "single", str(out)], _child_env())
        procs.wait(["worker0", "worker1", "single"], RUN_TIMEOUT_S)
    finally:
        procs.close()
    return {(tag, name): dict(np.load(out / f"{tag}_{name}.npz"))
            for tag in ("worker0", "worker1", "single") for name in MODELS}


def _weights(arrays, prefix="w"):
    """The arrays saved as prefix0, prefix1, ... (the model's weights)."""
    count = sum(1 for k in arrays if re.fullmatch(prefix + r"\d+", k))
    return [arrays[f"{prefix}{i}"] for i in range(count)]


@pytest.mark.parametrize("name", MODELS)
def test_workers_end_with_identical_weights(multiworker_run, name):
    first = multiworker_run["worker0", name]
    second = multiworker_run["worker1", name]
    assert len(_weights(first)) == len(_weights(second)) > 0
    for a, b in zip(_weights(first), _weights(second)):
        # Synchronous training: both apply the same all-reduced gradients.
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first["losses"], second["losses"])


@pytest.mark.parametrize("name", MODELS)
def test_two_workers_equal_one_process_on_the_global_batch(multiworker_run,
                                                           name):
    worker = multiworker_run["worker0", name]
    single = multiworker_run["single", name]
    got, want = _weights(worker), _weights(single)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The reported loss of each step is the global-batch loss.
    np.testing.assert_allclose(worker["losses"], single["losses"], rtol=1e-5)
    # The steps really moved the weights (equality is not trivial).
    initial = _weights(single, "init")
    assert len(initial) == len(want)
    assert np.abs(want[0] - initial[0]).max() > 1e-2  # the first table
    assert all(np.isfinite(w).all() for w in got)


def test_sasrec_multiworker_loss_falls(multiworker_run):
    losses = multiworker_run["worker0", "sasrec"]["losses"]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------- ParameterServerStrategy

@pytest.fixture(scope="module")
def ps_run(tmp_path_factory):
    """Runs chief + 2 workers + 2 PS; returns the chief's result dict."""
    out = tmp_path_factory.mktemp("ps")
    script = os.path.join(TESTS_DIR, "_ps_cluster.py")
    ports = iter(_free_ports(5))
    cluster = {"chief": [f"127.0.0.1:{next(ports)}"],
               "worker": [f"127.0.0.1:{next(ports)}" for _ in range(2)],
               "ps": [f"127.0.0.1:{next(ports)}" for _ in range(2)]}
    spec = json.dumps(cluster)
    servers = [f"{job}{i}" for job in ("worker", "ps") for i in range(2)]
    procs = _Processes(str(out))
    try:
        for name in servers:
            procs.start(name, [script, "server", spec, name[:-1], name[-1]],
                        _child_env())
        procs.start("chief", [script, "chief", spec, str(out)], _child_env())
        procs.wait(["chief"], RUN_TIMEOUT_S)
        # The servers serve until killed: each still running means none
        # crashed under the chief's requests.
        exited = {n: procs.procs[n].poll() for n in servers}
        assert all(code is None for code in exited.values()), (
            exited, {n: procs.log(n) for n in servers})
    finally:
        procs.close()
    with open(out / "ps_result.json") as f:
        return json.load(f)


def test_ps_item_table_is_sharded_over_both_servers(ps_run):
    assert ps_run["table_type"] == "ShardedVariable"
    assert ps_run["table_shape"] == [48, 8]
    assert ps_run["shard_shapes"] == [[24, 8], [24, 8]]
    assert [d.split("/device:")[0] for d in ps_run["shard_devices"]] == [
        "/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"]
    # The optimizer sees both shards, and fit changed both.
    assert ps_run["trainable_shards"] == 2
    assert min(ps_run["shard_changes"]) > 1e-2
    # Every variable lives on a parameter server, on both of them in all.
    devices = {d.split("/device:")[0] for _, d in ps_run["variables"]}
    assert devices == {"/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"}


def test_ps_fit_reduces_the_loss(ps_run):
    losses = ps_run["losses"]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("loss", [
    "sampled_softmax", "sampled_softmax_per_row", "cce_minus_in_kernel",
    "cce_minus_shared", "cut_cross_entropy", "next_item_full_softmax"])
def test_ps_losses_on_the_sharded_table_equal_the_plain_table(ps_run, loss):
    sharded, plain, grad_diff, grad_max = ps_run["loss_checks"][loss]
    assert np.isfinite(sharded) and sharded > 0
    np.testing.assert_allclose(sharded, plain, rtol=1e-6)
    # Each shard gets its rows of the plain table's gradient.
    assert grad_max > 1e-3
    assert grad_diff <= 1e-6 * grad_max


# ------------------------------------------------------ the process harness

def _gone(pid):
    """True once `pid` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_failed_child_ends_the_wait_and_its_group_is_killed(tmp_path):
    """What the fixtures rely on: no process outlives a failed run."""
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, time\n"
            "p = subprocess.Popen(['sleep', '300'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(300)\n")
    procs = _Processes(str(tmp_path))
    try:
        procs.start("hang", ["-c", hang], dict(os.environ))
        procs.start("bad", ["-c", "import sys; print('boom'); sys.exit(2)"],
                    dict(os.environ))
        with pytest.raises(pytest.fail.Exception, match="(?s)bad exited "
                           "with 2.*boom"):
            procs.wait(["hang", "bad"], RUN_TIMEOUT_S)
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(pytest.fail.Exception, match="still running"):
            procs.wait(["hang"], 0.5)
    finally:
        procs.close()
    assert procs.procs["hang"].returncode == -signal.SIGKILL
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(grandchild):  # reaped by init after the group kill
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.1)
