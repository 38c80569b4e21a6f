"""joblib's ``Parallel`` on skate: the ``"skate"`` backend (``skate.joblib``).

What these tests promise:

- ``import skate.joblib`` registers the backend as ``"skate"``; ``register()`` may be
  called again; ``parallel_config(backend="skate")`` and the older ``parallel_backend``
  both select it; ``n_jobs=-1`` means every CPU of the cluster.
- Results equal a serial run (``n_jobs=1``): any batch size, keyword arguments, lambdas
  and closures, results unpickled into writable memory as loky gives them.
- joblib's auto-batching works on it: many fast calls grow the batch size.
- ``return_as="generator"`` yields in order as results arrive; ``"generator_unordered"``
  yields the fast ones first, while a slow call is still running.
- A failing call re-raises its original exception type (not a skate wrapper), with the
  remote traceback as its ``__cause__``; an argument that cannot be pickled raises
  joblib's ``PicklingError``; ``timeout=`` raises joblib's ``TimeoutError``.
- ``abort_everything``: after a failure, or when a result generator is dropped, the
  batches still queued or running are cancelled and their CPUs come back.
- ``n_jobs`` caps the batches running at once, even on a cluster with more CPUs.
- A large NumPy argument is put in the shared-memory store once per call, and tasks see
  it as a read-only array over shared memory; small ones are pickled with the batch.
- ``initializer``/``initargs`` run once in each worker process a call uses;
  ``multiprocessing.Manager`` proxies passed to tasks connect back to their manager.
- Nested ``Parallel`` calls do not oversubscribe: inside a task they run on threads of
  the task's process (then sequentially), and an explicitly nested skate ``Parallel``
  finishes on a cluster whose CPUs its parents hold.
- A worker killed by ``os._exit`` mid-batch: the batch is retried; with
  ``max_retries=0`` the call fails with ``WorkerCrashedError``.
- scikit-learn's ``GridSearchCV``, ``cross_val_score`` and ``RandomForestClassifier``
  give the same results as serial runs.
"""

from __future__ import annotations

import os
import pickle
import time

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_backend, parallel_config

import skate
import skate.joblib
from skate.exceptions import WorkerCrashedError
from skate.joblib import SkateBackend
from skate_harness import wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("skate_cluster")]


def square(x):
    return x * x


def pid_of(_):
    return os.getpid()


# --- registration and selection ----------------------------------------------------------

def test_importing_registers_the_backend_and_register_is_idempotent():
    assert joblib.parallel.BACKENDS["skate"] is SkateBackend
    skate.joblib.register()
    skate.joblib.register()
    assert joblib.parallel.BACKENDS["skate"] is SkateBackend
    assert joblib.parallel.DEFAULT_BACKEND != "skate"   # the default is left alone


@pytest.mark.parametrize("context", [parallel_config, parallel_backend])
def test_both_context_managers_select_the_backend(context):
    with context(backend="skate"):
        p = Parallel(n_jobs=2)
        assert isinstance(p._backend, SkateBackend)
        assert p(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


def test_n_jobs_minus_one_means_every_cpu_of_the_cluster():
    cpus = int(skate.cluster_resources()["CPU"])
    with parallel_config(backend="skate"):
        assert joblib.effective_n_jobs(-1) == cpus
        assert joblib.effective_n_jobs(-2) == max(cpus - 1, 1)
        assert joblib.effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs == 0"):
        Parallel(n_jobs=0, backend="skate")._initialize_backend()


def test_n_jobs_one_runs_sequentially_in_the_caller():
    with parallel_config(backend="skate"):
        assert set(Parallel(n_jobs=1)(delayed(pid_of)(i) for i in range(5))) == {os.getpid()}


def test_tasks_run_in_worker_processes():
    pids = Parallel(n_jobs=2, backend="skate")(delayed(pid_of)(i) for i in range(20))
    assert os.getpid() not in pids


def test_unknown_backend_options_are_refused():
    with pytest.raises(ValueError, match="unknown option"):
        SkateBackend(num_cpu=2)
    with pytest.raises(ValueError):
        SkateBackend(max_retries=-5)


# --- results ----------------------------------------------------------------------------

def power(x, exponent=2, offset=0):
    return x ** exponent + offset


@pytest.mark.parametrize("batch_size", ["auto", 1, 7])
def test_results_equal_a_serial_run(batch_size):
    calls = [delayed(power)(i, exponent=3, offset=i % 5) for i in range(300)]
    serial = Parallel(n_jobs=1)(calls)
    assert Parallel(n_jobs=2, backend="skate", batch_size=batch_size)(calls) == serial


def test_lambdas_and_closures_work():
    k = 7
    assert Parallel(n_jobs=2, backend="skate")(delayed(lambda x: x + k)(i) for i in range(10)) == \
        [i + 7 for i in range(10)]


def test_returned_arrays_are_writable_as_with_loky():
    small, big = Parallel(n_jobs=2, backend="skate")(
        delayed(np.arange)(n) for n in (10, 1_000_000))
    for a in (small, big):
        assert a.flags.writeable
        a[0] = 42
    assert big.sum() == sum(range(1, 1_000_000)) + 42


def test_auto_batching_grows_the_batch_size_for_fast_calls():
    with Parallel(n_jobs=2, backend="skate", batch_size="auto") as p:
        assert p(delayed(square)(i) for i in range(5000)) == [i * i for i in range(5000)]
        assert p._backend.compute_batch_size() > 1


def test_batch_statistics_are_reset_after_a_call():
    p = Parallel(n_jobs=2, backend="skate")
    p(delayed(square)(i) for i in range(2000))
    assert p._backend._effective_batch_size == p._backend._DEFAULT_EFFECTIVE_BATCH_SIZE


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def test_generator_yields_in_order_before_all_results_exist():
    gen = Parallel(n_jobs=2, backend="skate", return_as="generator")(
        delayed(sleep_then)(i, 0.05 if i < 4 else 3) for i in range(8))
    first = [next(gen) for _ in range(4)]
    assert first == [0, 1, 2, 3]
    assert list(gen) == [4, 5, 6, 7]


def test_unordered_generator_yields_fast_results_while_a_slow_one_runs():
    gen = Parallel(n_jobs=2, backend="skate", return_as="generator_unordered", batch_size=1)(
        delayed(sleep_then)(i, 60 if i == 1 else 0.01) for i in range(10))
    fast = sorted(next(gen) for _ in range(9))
    assert fast == [0] + list(range(2, 10))
    del gen   # the slow one is cancelled (abort_everything)
    assert wait_for(lambda: skate.available_resources().get("CPU") == 2, timeout=30)


# --- errors -----------------------------------------------------------------------------

class FinickyError(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)
        self.a, self.b = a, b


def fail_at(i, bad, exc=ValueError):
    if i == bad:
        if exc is FinickyError:
            raise FinickyError("x", i)
        raise exc(f"call {i} failed")
    return i


def test_a_failing_call_raises_its_original_exception_with_the_remote_traceback():
    with pytest.raises(ValueError, match="call 13 failed") as info:
        Parallel(n_jobs=2, backend="skate")(delayed(fail_at)(i, 13) for i in range(40))
    assert type(info.value) is ValueError
    assert isinstance(info.value.__cause__, skate.joblib.RemoteTraceback)
    assert "fail_at" in str(info.value.__cause__)


def test_custom_exception_types_and_attributes_survive():
    with pytest.raises(FinickyError) as info:
        Parallel(n_jobs=2, backend="skate")(delayed(fail_at)(i, 3, FinickyError) for i in range(10))
    assert (info.value.a, info.value.b) == ("x", 3)


def test_the_managed_backend_keeps_working_after_a_failure():
    with Parallel(n_jobs=2, backend="skate") as p:
        with pytest.raises(ZeroDivisionError):
            p(delayed(lambda x: 1 / x)(i) for i in (1, 0, 2))
        assert p(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("not today")


def test_an_argument_that_cannot_be_pickled_raises_pickling_error():
    with pytest.raises(pickle.PicklingError, match="the task to send"):
        Parallel(n_jobs=2, backend="skate")(delayed(id)(Unpicklable()) for _ in range(5))


def test_timeout_raises_timeout_error():
    from multiprocessing import TimeoutError   # what joblib raises, whatever the backend
    with pytest.raises(TimeoutError):
        Parallel(n_jobs=2, backend="skate", timeout=0.5)(delayed(time.sleep)(60) for _ in range(4))
    assert wait_for(lambda: skate.available_resources().get("CPU") == 2, timeout=30)


def slow_or_fail(i, marker_dir):
    if i == 0:
        time.sleep(0.5)
        raise KeyError("first call fails")
    time.sleep(60)
    open(os.path.join(marker_dir, str(i)), "w").close()
    return i


def test_a_failure_cancels_the_batches_still_queued_or_running(tmp_path):
    with pytest.raises(KeyError):
        Parallel(n_jobs=2, backend="skate", batch_size=1)(
            delayed(slow_or_fail)(i, str(tmp_path)) for i in range(10))
    # The 60 s calls that were running are interrupted: their CPUs come back long before.
    assert wait_for(lambda: skate.available_resources().get("CPU") == 2, timeout=30)
    assert os.listdir(tmp_path) == []


# --- concurrency -----------------------------------------------------------------------

def count_running(run_dir, seconds):
    """Registers itself in ``run_dir`` while it runs; returns how many ran at its start."""
    me = os.path.join(run_dir, f"{os.getpid()}-{time.monotonic_ns()}")
    open(me, "w").close()
    try:
        seen = len(os.listdir(run_dir))
        time.sleep(seconds)
        return max(seen, len(os.listdir(run_dir)))
    finally:
        os.unlink(me)


def test_n_jobs_caps_the_batches_running_at_once_on_a_bigger_cluster(start_cluster, tmp_path):
    start_cluster(num_cpus=4)
    seen = Parallel(n_jobs=2, backend="skate", batch_size=1)(
        delayed(count_running)(str(tmp_path), 0.2) for _ in range(12))
    assert max(seen) <= 2
    # With n_jobs=-1 all four CPUs are used.
    seen = Parallel(n_jobs=-1, backend="skate", batch_size=1)(
        delayed(count_running)(str(tmp_path), 0.5) for _ in range(8))
    assert max(seen) <= 4


# --- large arrays ------------------------------------------------------------------------

def describe_array(a, i):
    """What the task sees: writable?, backed by shared memory?, a checksum."""
    base = a
    while getattr(base, "base", None) is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return a.flags.writeable, type(base).__name__, float(a[i])


def test_a_large_array_is_put_once_and_read_from_shared_memory(monkeypatch):
    puts = []
    real_put = skate.api.put
    monkeypatch.setattr(skate.api, "put", lambda value: puts.append(value.nbytes) or real_put(value))
    big = np.arange(4_000_000, dtype=np.float64)          # 32 MB
    out = Parallel(n_jobs=2, backend="skate", batch_size=1)(delayed(describe_array)(big, i) for i in range(20))
    assert puts == [big.nbytes]
    assert out == [(False, "mmap", float(i)) for i in range(20)]


def test_small_arrays_travel_with_the_batch_and_are_writable(monkeypatch):
    puts = []
    monkeypatch.setattr(skate.api, "put", lambda value: puts.append(value))
    small = np.arange(1000)
    out = Parallel(n_jobs=2, backend="skate")(delayed(describe_array)(small, i) for i in range(5))
    assert puts == []
    assert [w for w, _, _ in out] == [True] * 5


def test_max_nbytes_sets_the_threshold_and_none_disables_it(monkeypatch):
    puts = []
    real_put = skate.api.put
    monkeypatch.setattr(skate.api, "put", lambda value: puts.append(value.nbytes) or real_put(value))
    small = np.arange(1000)
    out = Parallel(n_jobs=2, backend="skate", max_nbytes=100)(delayed(describe_array)(small, i) for i in range(5))
    assert puts == [small.nbytes] and {w for w, _, _ in out} == {False}
    puts.clear()
    big = np.zeros(2_000_000)
    Parallel(n_jobs=2, backend="skate", max_nbytes=None)(delayed(describe_array)(big, 0) for _ in range(2))
    assert puts == []


def write_first(a):
    a[0] = -1
    return float(a[0])


def test_mmap_mode_c_gives_tasks_a_private_writable_copy():
    big = np.zeros(2_000_000)
    assert Parallel(n_jobs=2, backend="skate", mmap_mode="c")(delayed(write_first)(big) for _ in range(2)) == [-1.0] * 2
    assert big[0] == 0
    with pytest.raises(ValueError, match="read-only"):
        Parallel(n_jobs=2, backend="skate")(delayed(write_first)(big) for _ in range(2))


def blas_threads(_array):
    from threadpoolctl import threadpool_info
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_native_thread_pools_are_limited_as_loky_limits_them():
    # As loky: the cluster's CPUs divided among the n_jobs workers, unless told otherwise.
    # (The array argument makes the task import NumPy, hence load its BLAS.)
    a = np.ones(3)
    assert Parallel(n_jobs=2, backend="skate")(delayed(blas_threads)(a) for i in range(2)) == [{1}, {1}]
    with parallel_config(backend="skate", inner_max_num_threads=2):
        assert Parallel(n_jobs=2)(delayed(blas_threads)(a) for i in range(2)) == [{2}, {2}]


# --- initializer and Manager proxies -----------------------------------------------------

def mark_initialized(run_dir, token):
    os.environ["SKATE_JOBLIB_TEST_INIT"] = token
    open(os.path.join(run_dir, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()


def initialized_as(_):
    return os.getpid(), os.environ.get("SKATE_JOBLIB_TEST_INIT")


@pytest.mark.parametrize("where", ["parallel_config", "Parallel"])
def test_the_initializer_runs_once_in_each_worker_process_a_call_uses(tmp_path, where):
    token = f"{where}-{time.monotonic_ns()}"
    init = {"initializer": mark_initialized, "initargs": (str(tmp_path), token)}
    calls = (delayed(initialized_as)(i) for i in range(40))
    if where == "parallel_config":
        with parallel_config(backend="skate", **init):
            out = Parallel(n_jobs=2, batch_size=1)(calls)
    else:
        out = Parallel(n_jobs=2, backend="skate", batch_size=1, **init)(calls)
    assert {t for _, t in out} == {token}
    runs = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert sorted(runs) == sorted({str(pid) for pid, _ in out})   # once per process


def append_to(shared, i):
    shared.append(i)
    return len(shared) > 0


def test_manager_proxies_passed_to_tasks_connect_back():
    import multiprocessing
    with multiprocessing.Manager() as manager:
        shared = manager.list()
        assert all(Parallel(n_jobs=2, backend="skate")(delayed(append_to)(shared, i) for i in range(10)))
        assert sorted(shared) == list(range(10))


# --- nesting ---------------------------------------------------------------------------

def inner_pids(_):
    backend = type(joblib.parallel.get_active_backend()[0]).__name__
    return backend, Parallel(n_jobs=2)(delayed(pid_of)(j) for j in range(4))


def nested_levels(_):
    return Parallel(n_jobs=2)(delayed(inner_pids)(j) for j in range(2))


def test_nested_parallel_runs_on_threads_of_the_task_then_sequentially():
    outer = Parallel(n_jobs=2, backend="skate")(delayed(inner_pids)(i) for i in range(4))
    for backend, pids in outer:
        assert backend == "ThreadingBackend"
        assert len(set(pids)) == 1 and os.getpid() not in pids
    deeper = Parallel(n_jobs=2, backend="skate")(delayed(nested_levels)(i) for i in range(2))
    for level in deeper:
        for backend, pids in level:
            assert backend == "SequentialBackend"
            assert len(set(pids)) == 1


def inner_on_skate(i):
    return sum(Parallel(n_jobs=2, backend="skate")(delayed(square)(j) for j in range(i, i + 4)))


def test_an_explicit_nested_skate_parallel_finishes_while_parents_hold_every_cpu():
    # 2 CPUs, 2 parents each waiting for 2 children: the parents lend their CPUs back.
    out = Parallel(n_jobs=2, backend="skate", batch_size=1)(delayed(inner_on_skate)(i) for i in range(4))
    assert out == [sum(j * j for j in range(i, i + 4)) for i in range(4)]


# --- worker crashes -------------------------------------------------------------------------

def crash_once(i, marker):
    if i == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return i


def test_a_worker_killed_mid_batch_is_replaced_and_the_batch_retried(tmp_path):
    marker = str(tmp_path / "crashed")
    assert Parallel(n_jobs=2, backend="skate")(delayed(crash_once)(i, marker) for i in range(10)) == list(range(10))
    assert os.path.exists(marker)


def test_with_max_retries_zero_a_crash_fails_the_call(tmp_path):
    marker = str(tmp_path / "crashed")
    with parallel_config(backend="skate", max_retries=0):
        with pytest.raises(WorkerCrashedError):
            Parallel(n_jobs=2)(delayed(crash_once)(i, marker) for i in range(10))


# --- scikit-learn ----------------------------------------------------------------------------

def _same(a, b):
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _count_batches(monkeypatch):
    sent = []
    real = SkateBackend.submit
    monkeypatch.setattr(SkateBackend, "submit", lambda self, f, callback=None: sent.append(1) or real(self, f, callback))
    return sent


def test_grid_search_cv_equals_serial(monkeypatch):
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)

    def fit(n_jobs):
        s = GridSearchCV(SVC(), {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]},
                         cv=KFold(5, shuffle=True, random_state=0), n_jobs=n_jobs).fit(X, y)
        return {"score": s.cv_results_["mean_test_score"], "best": [s.best_params_["C"], s.best_params_["gamma"]],
                "predict": s.predict(X)}

    serial = fit(1)
    sent = _count_batches(monkeypatch)
    with parallel_config(backend="skate"):
        assert _same(serial, fit(2))
    assert sent


def test_cross_val_score_equals_serial(monkeypatch):
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import KFold, cross_val_score

    X, y = load_iris(return_X_y=True)
    model = RandomForestClassifier(n_estimators=20, random_state=0)
    cv = KFold(5, shuffle=True, random_state=1)
    serial = cross_val_score(model, X, y, cv=cv, n_jobs=1)
    sent = _count_batches(monkeypatch)
    with parallel_config(backend="skate"):
        assert np.array_equal(cross_val_score(model, X, y, cv=cv, n_jobs=2), serial)
    assert sent


def test_random_forest_n_jobs_equals_serial(monkeypatch):
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    X, y = load_iris(return_X_y=True)

    def fit(n_jobs):
        m = RandomForestClassifier(n_estimators=40, random_state=0, n_jobs=n_jobs).fit(X, y)
        return {"proba": m.predict_proba(X), "importances": m.feature_importances_}

    serial = fit(1)
    sent = _count_batches(monkeypatch)
    with parallel_config(backend="skate"):
        assert _same(serial, fit(2))
    assert sent
