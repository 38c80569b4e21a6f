"""Tasks: remote functions, their options, and how arguments travel to them.

What these tests promise:

- ``f.remote(...)`` returns at once with an ObjectRef; ``skate.get`` gives the value, for
  one task or ten thousand, in submission order.
- Options given to ``@skate.remote(...)`` hold for every call, and ``f.options(...)``
  overrides them for one call only: ``num_returns`` (2, 3, 0), ``name``, ``num_cpus``,
  ``resources``.
- A task asking for resources no node has fails at ``get`` with ``InfeasibleTaskError``;
  it never waits forever.
- ObjectRefs given as top-level arguments arrive as their values; refs inside containers
  arrive as refs, which the task may ``get``. Refs travel through nested tasks.
- A task that blocks in ``get`` lends its CPU back: a chain of 20 tasks, each waiting for
  the next, finishes on 2 CPUs.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import skate
from skate.exceptions import InfeasibleTaskError
from skate_harness import wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("skate_cluster")]

GET_TIMEOUT = 60  # a get that takes this long means a hang


@skate.remote
def double(x):
    return 2 * x


@skate.remote
def wait_for_file(path, result=None):
    """Blocks until ``path`` exists (the test's way to hold a task running)."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return result


def touch(path):
    with open(path, "w"):
        pass


def test_one_task_returns_its_value():
    ref = double.remote(21)
    assert isinstance(ref, skate.ObjectRef)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 42


def test_ten_thousand_tasks_return_their_results_in_order():
    refs = [double.remote(i) for i in range(10_000)]
    assert skate.get(refs, timeout=GET_TIMEOUT) == [2 * i for i in range(10_000)]


def test_get_of_a_tuple_of_refs_returns_a_list_in_order():
    refs = (double.remote(1), double.remote(2), double.remote(3))
    assert skate.get(refs, timeout=GET_TIMEOUT) == [2, 4, 6]
    assert skate.get([], timeout=GET_TIMEOUT) == []


def test_keyword_arguments_and_defaults_reach_the_function():
    @skate.remote
    def describe(a, b=10, *rest, c, **more):
        return a, b, rest, c, more

    assert skate.get(describe.remote(1, c=3), timeout=GET_TIMEOUT) == (1, 10, (), 3, {})
    assert skate.get(describe.remote(1, 2, 5, 6, c=3, d=4), timeout=GET_TIMEOUT) == (1, 2, (5, 6), 3, {"d": 4})


def test_closures_and_lambdas_run_as_tasks():
    offset = 7
    add_offset = skate.remote(lambda x: x + offset)
    assert skate.get(add_offset.remote(1), timeout=GET_TIMEOUT) == 8


# --- options -----------------------------------------------------------------------------

@skate.remote(num_returns=2)
def split_pair(a, b):
    return a, b


def test_num_returns_two_gives_one_ref_per_value():
    first, second = split_pair.remote("a", "b")
    assert skate.get(first, timeout=GET_TIMEOUT) == "a"
    assert skate.get(second, timeout=GET_TIMEOUT) == "b"


def test_options_override_num_returns_for_one_call_only():
    @skate.remote(num_returns=2)
    def values(*xs):
        return xs

    refs = values.options(num_returns=3).remote(1, 2, 3)
    assert len(refs) == 3
    assert skate.get(refs, timeout=GET_TIMEOUT) == [1, 2, 3]
    # The function's own option is untouched by the override.
    a, b = values.remote(4, 5)
    assert skate.get([a, b], timeout=GET_TIMEOUT) == [4, 5]


def test_num_returns_zero_returns_none_and_the_task_still_runs(tmp_path):
    marker = tmp_path / "ran"

    @skate.remote(num_returns=0)
    def side_effect(path):
        with open(path, "w") as f:
            f.write("done")

    assert side_effect.remote(str(marker)) is None
    assert wait_for(marker.exists, timeout=GET_TIMEOUT)

    # The same through .options() on a function that normally returns one value.
    marker2 = tmp_path / "ran2"

    @skate.remote
    def side_effect2(path):
        with open(path, "w") as f:
            f.write("done")
        return "a value nobody asked for"

    assert side_effect2.options(num_returns=0).remote(str(marker2)) is None
    assert wait_for(marker2.exists, timeout=GET_TIMEOUT)


def test_options_name_renames_the_task_where_users_see_it():
    @skate.remote
    def original_name():
        raise ValueError("boom")

    with pytest.raises(skate.exceptions.TaskError) as info:
        skate.get(original_name.options(name="renamed_task").remote(), timeout=GET_TIMEOUT)
    assert info.value.function_name == "renamed_task"
    assert "renamed_task()" in str(info.value)

    with pytest.raises(skate.exceptions.TaskError) as info:
        skate.get(original_name.remote(), timeout=GET_TIMEOUT)
    assert info.value.function_name == "original_name"


def test_a_task_with_num_cpus_2_holds_both_cpus_while_it_runs(tmp_path):
    release = tmp_path / "release"
    big = wait_for_file.options(num_cpus=2).remote(str(release), "big")
    # While it runs nothing is left for other tasks: a 1-CPU task waits.
    assert wait_for(lambda: skate.available_resources().get("CPU", 0.0) == 0.0, timeout=GET_TIMEOUT)
    small = double.remote(1)
    ready, _ = skate.wait([small], timeout=0.5)
    assert ready == []
    touch(release)
    assert skate.get([big, small], timeout=GET_TIMEOUT) == ["big", 2]


def test_decorator_options_apply_to_every_call():
    @skate.remote(num_cpus=2, max_retries=0, name="heavy")
    def heavy(x):
        return x * 3

    assert skate.get([heavy.remote(i) for i in range(5)], timeout=GET_TIMEOUT) == [0, 3, 6, 9, 12]


def test_a_task_asking_for_more_cpus_than_the_cluster_has_fails_at_get():
    ref = double.options(num_cpus=3).remote(1)
    with pytest.raises(InfeasibleTaskError) as info:
        skate.get(ref, timeout=GET_TIMEOUT)
    assert "CPU" in str(info.value)
    assert skate.get(double.remote(5), timeout=GET_TIMEOUT) == 10


def test_a_task_asking_for_a_custom_resource_no_node_has_fails_at_get():
    ref = double.options(resources={"unobtainium": 1}).remote(1)
    with pytest.raises(InfeasibleTaskError) as info:
        skate.get(ref, timeout=GET_TIMEOUT)
    assert "unobtainium" in str(info.value)
    assert skate.get(double.remote(5), timeout=GET_TIMEOUT) == 10


def test_a_task_asking_for_a_gpu_on_a_cluster_without_gpus_fails_at_get():
    ref = double.options(num_gpus=1).remote(1)
    with pytest.raises(InfeasibleTaskError):
        skate.get(ref, timeout=GET_TIMEOUT)
    # wait() does not hang on it either: the ref is ready (with its error).
    ready, _ = skate.wait([double.options(num_gpus=1).remote(1)], timeout=GET_TIMEOUT)
    assert len(ready) == 1


def test_infeasible_error_is_raised_for_every_queued_task_of_that_shape():
    refs = [double.options(resources={"unobtainium": 2}).remote(i) for i in range(20)]
    for ref in refs:
        with pytest.raises(InfeasibleTaskError):
            skate.get(ref, timeout=GET_TIMEOUT)


# --- arguments -----------------------------------------------------------------------------

@skate.remote
def type_and_value(x):
    return type(x).__name__, x if not isinstance(x, np.ndarray) else float(x.sum())


def test_top_level_ref_arguments_arrive_as_their_values():
    small = skate.put({"k": 1})
    assert skate.get(type_and_value.remote(small), timeout=GET_TIMEOUT) == ("dict", {"k": 1})

    arr = np.arange(1_000_000, dtype=np.float64)   # 8 MB: lives in shared memory
    big = skate.put(arr)
    assert skate.get(type_and_value.remote(big), timeout=GET_TIMEOUT) == ("ndarray", float(arr.sum()))

    # A task's output as the argument of another.
    assert skate.get(type_and_value.remote(double.remote(4)), timeout=GET_TIMEOUT) == ("int", 8)


def test_top_level_ref_keyword_arguments_arrive_as_their_values():
    @skate.remote
    def add(a, *, b):
        return a + b

    assert skate.get(add.remote(skate.put(1), b=skate.put(2)), timeout=GET_TIMEOUT) == 3
    assert skate.get(add.remote(a=double.remote(1), b=double.remote(2)), timeout=GET_TIMEOUT) == 6


def test_refs_nested_in_containers_arrive_as_refs():
    @skate.remote
    def inspect_nested(lst, dct):
        assert isinstance(lst[0], skate.ObjectRef), type(lst[0])
        assert isinstance(dct["r"], skate.ObjectRef), type(dct["r"])
        return skate.get(lst[0]) + skate.get(dct["r"])

    a = skate.put(40)
    b = double.remote(1)
    assert skate.get(inspect_nested.remote([a], {"r": b}), timeout=GET_TIMEOUT) == 42


def test_a_task_waits_for_an_argument_that_is_not_ready_yet(tmp_path):
    release = tmp_path / "release"
    upstream = wait_for_file.remote(str(release), 5)
    downstream = double.remote(upstream)
    ready, _ = skate.wait([downstream], timeout=0.5)
    assert ready == []
    touch(release)
    assert skate.get(downstream, timeout=GET_TIMEOUT) == 10


@skate.remote
def level3(nested, top_value):
    """The innermost task: ``nested`` still holds a ref, ``top_value`` was resolved."""
    assert isinstance(nested[0], skate.ObjectRef)
    assert not isinstance(top_value, skate.ObjectRef)
    return float(np.asarray(skate.get(nested[0])).sum()), float(np.asarray(top_value).sum())


@skate.remote
def level2(nested):
    return skate.get(level3.remote(nested, nested[0]))


@skate.remote
def level1(nested):
    return skate.get(level2.remote(nested))


@pytest.mark.parametrize("value", [
    [1, 2, 3],                                       # small: travels inline
    np.arange(1_000_000, dtype=np.float64),          # large: in shared memory
], ids=["inline", "shared-memory"])
def test_refs_pass_through_three_levels_of_nested_tasks(value):
    ref = skate.put(value)
    expected = float(np.asarray(value).sum())
    assert skate.get(level1.remote([ref]), timeout=GET_TIMEOUT) == (expected, expected)


def test_a_ref_made_in_a_nested_task_reaches_the_driver():
    @skate.remote
    def make():
        return [skate.put(np.full(200_000, 3.0)), skate.put("small")]

    @skate.remote
    def relay():
        return skate.get(make.remote())

    big_ref, small_ref = skate.get(relay.remote(), timeout=GET_TIMEOUT)
    assert float(skate.get(big_ref, timeout=GET_TIMEOUT).sum()) == 600_000.0
    assert skate.get(small_ref, timeout=GET_TIMEOUT) == "small"


@skate.remote
def chain(depth):
    if depth == 0:
        return 0
    return skate.get(chain.remote(depth - 1)) + 1


def test_a_chain_of_20_tasks_each_getting_the_next_finishes_on_2_cpus():
    assert skate.get(chain.remote(20), timeout=GET_TIMEOUT) == 20
    # The CPUs lent out by blocked tasks come back.
    assert wait_for(lambda: skate.available_resources().get("CPU") == 2.0, timeout=10)


def test_tasks_inside_tasks_can_wait_on_their_children():
    @skate.remote
    def fan_out(n):
        refs = [double.remote(i) for i in range(n)]
        ready, not_ready = skate.wait(refs, num_returns=n)
        assert not not_ready
        return sum(skate.get(ready))

    assert skate.get(fan_out.remote(50), timeout=GET_TIMEOUT) == sum(2 * i for i in range(50))


def test_a_task_runs_in_another_process_than_the_driver():
    @skate.remote
    def pid():
        return os.getpid()

    pids = set(skate.get([pid.remote() for _ in range(20)], timeout=GET_TIMEOUT))
    assert os.getpid() not in pids


def test_short_tasks_do_not_wait_behind_a_long_one_while_a_worker_idles(skate_cluster, tmp_path):
    """Short tasks are pipelined several to a worker; when one of them turns out long,
    the tasks queued behind it move to the idle worker instead of waiting."""
    release = tmp_path / "release"

    @skate.remote
    def step(i, gate):
        while gate and not os.path.exists(gate):
            time.sleep(0.01)
        return i

    skate.get([step.remote(i, None) for i in range(300)])   # the class now looks short
    blocker = step.remote(-1, str(release))
    quick = [step.remote(i, None) for i in range(8)]
    ready, _ = skate.wait(quick, num_returns=8, timeout=60)
    release.touch()
    assert len(ready) == 8          # all done while the blocker still held its worker
    assert skate.get(blocker, timeout=60) == -1
