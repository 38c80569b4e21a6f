"""Errors: what users see when a task fails, crashes, times out or is cancelled, and bad input.

What these tests promise:

- An exception raised in a task re-raises at ``get`` as an instance of both
  ``skate.exceptions.TaskError`` and the original type, with the remote traceback in its
  message; it also fails the tasks that take the failed result as an argument.
- A worker process that dies mid-task (``os._exit``) has its task retried up to
  ``max_retries`` times (default 3); past that, ``get`` raises ``WorkerCrashedError``.
  Application errors are retried only when ``retry_exceptions`` says so.
- ``get(timeout=...)`` raises ``GetTimeoutError``, which is also a ``TimeoutError``.
- ``cancel`` ends a queued or a running task with ``TaskCancelledError``; ``force=True``
  kills a task that ignores the cancellation; tasks it submitted are cancelled too.
- Bad input fails at the call, with a message that names the problem, and never breaks
  the calls that follow (every test here runs a normal task afterwards).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import skate
from skate.exceptions import (GetTimeoutError, OwnerDiedError, SkateError, TaskCancelledError, TaskError,
                              WorkerCrashedError)
from skate_harness import wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("skate_cluster")]

GET_TIMEOUT = 60


@skate.remote
def double(x):
    return 2 * x


def assert_runtime_still_works():
    """What follows any error: a normal task still runs."""
    assert skate.get(double.remote(21), timeout=GET_TIMEOUT) == 42


def count_lines(path) -> int:
    try:
        with open(path) as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


def touch(path):
    with open(path, "w"):
        pass


# --- exceptions raised in tasks ------------------------------------------------------------------

class AppError(Exception):
    """An application's own exception type."""


class TwoArgError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


@skate.remote
def fail_with_value_error(x):
    raise ValueError(f"bad value {x}")


def test_a_task_exception_is_both_a_task_error_and_the_original_type():
    ref = fail_with_value_error.remote(7)
    with pytest.raises(ValueError) as info:
        skate.get(ref, timeout=GET_TIMEOUT)
    err = info.value
    assert isinstance(err, TaskError)
    assert isinstance(err, skate.exceptions.RayTaskError)   # Ray's name still catches it
    assert isinstance(err, SkateError)
    assert err.args == ("bad value 7",)
    assert_runtime_still_works()


def test_the_error_message_carries_the_remote_traceback():
    with pytest.raises(TaskError) as info:
        skate.get(fail_with_value_error.remote(7), timeout=GET_TIMEOUT)
    text = str(info.value)
    assert "Traceback (most recent call last)" in text
    assert "fail_with_value_error" in text                  # the function's frame
    assert 'raise ValueError(f"bad value {x}")' in text     # the line that raised
    assert "ValueError: bad value 7" in text
    assert "pid=" in text                                   # which worker ran it
    assert info.value.function_name == "fail_with_value_error"


def test_user_defined_exception_types_are_preserved_with_their_attributes():
    @skate.remote
    def fail_app():
        raise AppError("app failed")

    @skate.remote
    def fail_two_args():
        raise TwoArgError(404, "missing")

    with pytest.raises(AppError) as info:
        skate.get(fail_app.remote(), timeout=GET_TIMEOUT)
    assert isinstance(info.value, TaskError)
    assert "AppError: app failed" in str(info.value)

    with pytest.raises(TwoArgError) as info:
        skate.get(fail_two_args.remote(), timeout=GET_TIMEOUT)
    assert (info.value.code, info.value.detail) == (404, "missing")
    assert_runtime_still_works()


def test_builtin_exception_types_can_be_caught_by_their_own_name():
    @skate.remote
    def fail_key():
        return {}["missing"]

    @skate.remote
    def fail_zero():
        return 1 / 0

    with pytest.raises(KeyError):
        skate.get(fail_key.remote(), timeout=GET_TIMEOUT)
    with pytest.raises(ZeroDivisionError):
        skate.get(fail_zero.remote(), timeout=GET_TIMEOUT)


def test_a_failed_result_fails_the_tasks_that_take_it_as_an_argument():
    downstream = double.remote(fail_with_value_error.remote(1))
    with pytest.raises(ValueError) as info:
        skate.get(downstream, timeout=GET_TIMEOUT)
    assert "bad value 1" in str(info.value)
    assert_runtime_still_works()


def test_an_error_in_a_nested_task_reaches_the_driver_with_its_type():
    @skate.remote
    def parent():
        return skate.get(fail_with_value_error.remote(3))

    with pytest.raises(ValueError) as info:
        skate.get(parent.remote(), timeout=GET_TIMEOUT)
    assert "bad value 3" in str(info.value)


def test_every_return_of_a_failed_multi_return_task_raises():
    @skate.remote(num_returns=2)
    def fail_two():
        raise AppError("both")

    a, b = fail_two.remote()
    for ref in (a, b):
        with pytest.raises(AppError):
            skate.get(ref, timeout=GET_TIMEOUT)


def test_returning_the_wrong_number_of_values_fails_at_get():
    @skate.remote(num_returns=2)
    def three():
        return 1, 2, 3

    a, b = three.remote()
    with pytest.raises(ValueError) as info:
        skate.get(a, timeout=GET_TIMEOUT)
    assert "num_returns=2" in str(info.value)
    assert_runtime_still_works()


def test_a_return_value_that_cannot_be_serialized_fails_at_get():
    @skate.remote
    def return_lock():
        return threading.Lock()

    with pytest.raises(TaskError) as info:
        skate.get(return_lock.remote(), timeout=GET_TIMEOUT)
    assert "lock" in str(info.value).lower()
    assert_runtime_still_works()


# --- timeouts --------------------------------------------------------------------------------------

@skate.remote
def wait_for_file(path, result=None):
    while not os.path.exists(path):
        time.sleep(0.01)
    return result


def test_get_with_a_timeout_raises_get_timeout_error_which_is_a_timeout_error(tmp_path):
    release = str(tmp_path / "release")
    ref = wait_for_file.remote(release, "late")
    with pytest.raises(GetTimeoutError) as info:
        skate.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, skate.exceptions.ObjectFetchTimedOutError)
    with pytest.raises(TimeoutError):
        skate.get([double.remote(1), ref], timeout=0.2)
    # The object is not spoiled by the timeout.
    touch(release)
    assert skate.get(ref, timeout=GET_TIMEOUT) == "late"


def test_get_with_a_negative_or_non_numeric_timeout_is_a_value_error():
    ref = double.remote(1)
    with pytest.raises(ValueError):
        skate.get(ref, timeout=-1)
    with pytest.raises(ValueError):
        skate.get(ref, timeout="soon")
    assert skate.get(ref, timeout=0 + GET_TIMEOUT) == 2


# --- worker crashes and retries ---------------------------------------------------------------------

@skate.remote
def crash_until(attempts_file, crashes):
    """Records an attempt, then kills its own worker process while fewer than ``crashes`` happened."""
    with open(attempts_file, "a") as f:
        f.write("attempt\n")
    with open(attempts_file) as f:
        n = len(f.read().splitlines())
    if n <= crashes:
        os._exit(1)
    return n


def test_a_task_whose_worker_crashes_once_is_retried_and_succeeds(tmp_path):
    attempts = str(tmp_path / "attempts")
    assert skate.get(crash_until.remote(attempts, 1), timeout=GET_TIMEOUT) == 2
    assert count_lines(attempts) == 2
    assert_runtime_still_works()


def test_the_default_max_retries_is_three(tmp_path):
    attempts = str(tmp_path / "attempts")
    assert skate.get(crash_until.remote(attempts, 3), timeout=GET_TIMEOUT) == 4
    attempts2 = str(tmp_path / "attempts2")
    with pytest.raises(WorkerCrashedError):
        skate.get(crash_until.remote(attempts2, 4), timeout=GET_TIMEOUT)
    assert count_lines(attempts2) == 4


def test_a_task_crashing_beyond_max_retries_raises_worker_crashed_error(tmp_path):
    attempts = str(tmp_path / "attempts")
    ref = crash_until.options(max_retries=2).remote(attempts, 100)
    with pytest.raises(WorkerCrashedError) as info:
        skate.get(ref, timeout=GET_TIMEOUT)
    assert "crash_until" in str(info.value)
    assert count_lines(attempts) == 3          # the first run and two retries
    assert_runtime_still_works()


def test_max_retries_zero_means_one_attempt(tmp_path):
    attempts = str(tmp_path / "attempts")
    with pytest.raises(WorkerCrashedError):
        skate.get(crash_until.options(max_retries=0).remote(attempts, 1), timeout=GET_TIMEOUT)
    assert count_lines(attempts) == 1
    assert_runtime_still_works()


def test_a_worker_killed_from_outside_is_retried(tmp_path):
    started = str(tmp_path / "started")

    @skate.remote
    def long_task(started):
        with open(started, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(started) as f:
            if len(f.read().splitlines()) == 1:
                time.sleep(60)
        return "second attempt"

    ref = long_task.remote(started)
    assert wait_for(lambda: count_lines(started) == 1, timeout=GET_TIMEOUT)
    with open(started) as f:
        os.kill(int(f.read().split()[0]), signal.SIGKILL)
    assert skate.get(ref, timeout=GET_TIMEOUT) == "second attempt"


@skate.remote
def fail_until(attempts_file, failures, exc_type):
    with open(attempts_file, "a") as f:
        f.write("attempt\n")
    with open(attempts_file) as f:
        n = len(f.read().splitlines())
    if n <= failures:
        raise exc_type(f"attempt {n} failed")
    return n


def test_application_errors_are_not_retried_by_default(tmp_path):
    attempts = str(tmp_path / "attempts")
    with pytest.raises(ValueError):
        skate.get(fail_until.remote(attempts, 1, ValueError), timeout=GET_TIMEOUT)
    assert count_lines(attempts) == 1


def test_retry_exceptions_true_retries_application_errors(tmp_path):
    attempts = str(tmp_path / "attempts")
    ref = fail_until.options(retry_exceptions=True).remote(attempts, 2, ValueError)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 3
    assert count_lines(attempts) == 3


def test_retry_exceptions_gives_up_after_max_retries(tmp_path):
    attempts = str(tmp_path / "attempts")
    ref = fail_until.options(retry_exceptions=True, max_retries=2).remote(attempts, 100, ValueError)
    with pytest.raises(ValueError) as info:
        skate.get(ref, timeout=GET_TIMEOUT)
    assert "attempt 3 failed" in str(info.value)
    assert count_lines(attempts) == 3


def test_retry_exceptions_list_retries_only_the_listed_types(tmp_path):
    listed = str(tmp_path / "listed")
    ref = fail_until.options(retry_exceptions=[ValueError]).remote(listed, 2, ValueError)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 3
    assert count_lines(listed) == 3

    # A subclass of a listed type counts as listed.
    subclass = str(tmp_path / "subclass")
    ref = fail_until.options(retry_exceptions=[LookupError]).remote(subclass, 1, KeyError)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 2

    unlisted = str(tmp_path / "unlisted")
    ref = fail_until.options(retry_exceptions=[ValueError]).remote(unlisted, 2, TypeError)
    with pytest.raises(TypeError):
        skate.get(ref, timeout=GET_TIMEOUT)
    assert count_lines(unlisted) == 1


def test_retry_exceptions_given_in_the_decorator(tmp_path):
    @skate.remote(retry_exceptions=[AppError], max_retries=1)
    def flaky(attempts_file):
        with open(attempts_file, "a") as f:
            f.write("attempt\n")
        if count_lines(attempts_file) == 1:
            raise AppError("first time")
        return "ok"

    attempts = str(tmp_path / "attempts")
    assert skate.get(flaky.remote(attempts), timeout=GET_TIMEOUT) == "ok"
    assert count_lines(attempts) == 2


# --- the owner of an object dying --------------------------------------------------------------------

def test_an_object_whose_owner_died_raises_owner_died_error():
    @skate.remote
    def put_in_worker():
        return os.getpid(), [skate.put(list(range(10)))]

    pid, (inner,) = skate.get(put_in_worker.remote(), timeout=GET_TIMEOUT)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(OwnerDiedError):
        skate.get(inner, timeout=GET_TIMEOUT)
    assert_runtime_still_works()


# --- cancellation ------------------------------------------------------------------------------------

def test_cancelling_a_queued_task_raises_task_cancelled_error_and_it_never_runs(tmp_path):
    release = str(tmp_path / "release")
    ran = tmp_path / "ran"
    blockers = [wait_for_file.remote(release, i) for i in range(2)]   # both CPUs busy

    @skate.remote
    def should_not_run(path):
        touch(path)

    queued = should_not_run.remote(str(ran))
    skate.cancel(queued)
    with pytest.raises(TaskCancelledError):
        skate.get(queued, timeout=GET_TIMEOUT)
    assert isinstance(TaskCancelledError(), skate.exceptions.TaskCancelledException)
    touch(release)
    assert skate.get(blockers, timeout=GET_TIMEOUT) == [0, 1]
    assert_runtime_still_works()
    assert not ran.exists()


def test_cancelling_a_running_task_interrupts_it(tmp_path):
    started = str(tmp_path / "started")

    @skate.remote
    def sleeper(started):
        touch(started)
        time.sleep(60)
        return "finished"

    ref = sleeper.remote(started)
    assert wait_for(lambda: os.path.exists(started), timeout=GET_TIMEOUT)
    skate.cancel(ref)
    with pytest.raises(TaskCancelledError):
        skate.get(ref, timeout=GET_TIMEOUT)
    assert_runtime_still_works()


def test_cancelling_a_task_that_ignores_cancellation_needs_force(tmp_path):
    started = str(tmp_path / "started")
    interrupted = str(tmp_path / "interrupted")

    @skate.remote
    def stubborn(started, interrupted):
        touch(started)
        while True:
            try:
                time.sleep(60)
            except BaseException:
                touch(interrupted)     # swallows the cancellation and goes on

    ref = stubborn.remote(started, interrupted)
    assert wait_for(lambda: os.path.exists(started), timeout=GET_TIMEOUT)
    skate.cancel(ref)
    assert wait_for(lambda: os.path.exists(interrupted), timeout=GET_TIMEOUT)
    ready, _ = skate.wait([ref], timeout=0.5)
    assert ready == []          # still running: it ignored the polite request
    skate.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        skate.get(ref, timeout=GET_TIMEOUT)
    assert_runtime_still_works()


def test_force_cancel_of_a_running_task_is_not_retried(tmp_path):
    attempts = str(tmp_path / "attempts")

    @skate.remote(max_retries=3)
    def sleeper(attempts):
        with open(attempts, "a") as f:
            f.write("attempt\n")
        time.sleep(60)

    ref = sleeper.remote(attempts)
    assert wait_for(lambda: count_lines(attempts) == 1, timeout=GET_TIMEOUT)
    skate.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        skate.get(ref, timeout=GET_TIMEOUT)
    assert_runtime_still_works()
    assert count_lines(attempts) == 1


def test_cancelling_a_task_cancels_the_tasks_it_submitted(tmp_path):
    child_started = str(tmp_path / "child_started")
    child_cancelled = str(tmp_path / "child_cancelled")

    @skate.remote
    def child(started, cancelled):
        touch(started)
        try:
            time.sleep(60)
        except TaskCancelledError:
            touch(cancelled)
            raise
        return "child finished"

    @skate.remote
    def parent(started, cancelled):
        return skate.get(child.remote(started, cancelled))

    ref = parent.remote(child_started, child_cancelled)
    assert wait_for(lambda: os.path.exists(child_started), timeout=GET_TIMEOUT)
    skate.cancel(ref)
    with pytest.raises(TaskCancelledError):
        skate.get(ref, timeout=GET_TIMEOUT)
    assert wait_for(lambda: os.path.exists(child_cancelled), timeout=GET_TIMEOUT)
    assert_runtime_still_works()


def test_cancel_with_recursive_false_leaves_the_tasks_it_submitted_running(tmp_path):
    child_started = str(tmp_path / "child_started")
    child_cancelled = str(tmp_path / "child_cancelled")
    child_done = str(tmp_path / "child_done")
    release = str(tmp_path / "release")

    @skate.remote
    def child(started, cancelled, done, release):
        touch(started)
        try:
            while not os.path.exists(release):
                time.sleep(0.01)
        except TaskCancelledError:
            touch(cancelled)
            raise
        touch(done)

    @skate.remote
    def parent(*paths):
        return skate.get(child.remote(*paths))

    ref = parent.remote(child_started, child_cancelled, child_done, release)
    assert wait_for(lambda: os.path.exists(child_started), timeout=GET_TIMEOUT)
    skate.cancel(ref, recursive=False)
    with pytest.raises(TaskCancelledError):
        skate.get(ref, timeout=GET_TIMEOUT)
    touch(release)
    assert wait_for(lambda: os.path.exists(child_done) or os.path.exists(child_cancelled), timeout=GET_TIMEOUT)
    assert not os.path.exists(child_cancelled), "the child was cancelled although recursive=False"


def test_cancelling_a_finished_task_changes_nothing():
    ref = double.remote(4)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 8
    skate.cancel(ref)
    assert skate.get(ref, timeout=GET_TIMEOUT) == 8


def test_cancel_of_something_that_is_not_a_ref_is_a_type_error():
    with pytest.raises(TypeError):
        skate.cancel("not a ref")
    assert_runtime_still_works()


# --- bad input -------------------------------------------------------------------------------------

def test_calling_a_remote_function_directly_is_a_type_error_naming_remote():
    with pytest.raises(TypeError) as info:
        double(1)
    assert "double.remote(" in str(info.value)
    assert_runtime_still_works()


@pytest.mark.parametrize("args, kwargs", [
    ((), {}),                   # missing argument
    ((1, 2), {}),               # one too many
    ((), {"y": 1}),             # unknown keyword
    ((1,), {"x": 1}),           # the same argument twice
], ids=["missing", "too-many", "unknown-keyword", "duplicate"])
def test_arguments_that_do_not_fit_the_signature_are_a_type_error_at_remote(args, kwargs):
    with pytest.raises(TypeError) as info:
        double.remote(*args, **kwargs)
    assert "double" in str(info.value)
    assert_runtime_still_works()


def test_an_argument_that_cannot_be_serialized_is_a_type_error_naming_it():
    @skate.remote
    def takes(a, b=None):
        return "ran"

    with pytest.raises(TypeError) as info:
        takes.remote(1, threading.Lock())
    message = str(info.value)
    assert "argument 1" in message
    assert "lock" in message.lower()            # the type that cannot be serialized

    with pytest.raises(TypeError) as info:
        takes.remote(1, b=threading.Lock())
    assert "'b'" in str(info.value)
    assert "lock" in str(info.value).lower()
    assert skate.get(takes.remote(1), timeout=GET_TIMEOUT) == "ran"


def test_get_of_something_that_is_not_a_ref_is_a_type_error():
    with pytest.raises(TypeError):
        skate.get(42)
    with pytest.raises(TypeError) as info:
        skate.get([double.remote(1), "not a ref"])
    assert "item 1" in str(info.value)
    assert_runtime_still_works()


def test_put_of_an_object_ref_is_a_type_error():
    with pytest.raises(TypeError):
        skate.put(double.remote(1))
    assert_runtime_still_works()


@pytest.mark.parametrize("options", [
    {"no_such_option": 1},
    {"num_cpus": -1},
    {"num_gpus": -0.5},
    {"num_returns": -1},
    {"num_returns": 1.5},
    {"max_retries": -2},
    {"resources": {"widget": -1}},
    {"resources": ["widget"]},
    {"resources": {"CPU": 1}},
    {"retry_exceptions": [42]},
    {"retry_exceptions": "ValueError"},
    {"name": 3},
], ids=lambda o: "-".join(f"{k}={v!r}" for k, v in o.items()))
def test_unknown_or_invalid_options_are_a_value_error(options):
    key = next(iter(options))
    with pytest.raises(ValueError) as info:
        skate.remote(**options)(lambda: None)
    assert key in str(info.value)
    with pytest.raises(ValueError) as info:
        double.options(**options)
    assert key in str(info.value)
    assert_runtime_still_works()


def test_remote_with_positional_arguments_that_are_not_a_function_is_a_type_error():
    with pytest.raises(TypeError):
        skate.remote(1, 2)
    with pytest.raises(TypeError):
        skate.remote(num_cpus=1)(42)
    assert_runtime_still_works()


@pytest.mark.parametrize("call", [
    lambda refs: skate.wait(refs + refs[:1]),                 # the same ref twice
    lambda refs: skate.wait(refs, num_returns=3),             # more than given
    lambda refs: skate.wait(refs, num_returns=-1),
    lambda refs: skate.wait(refs, num_returns=1.5),
    lambda refs: skate.wait(refs, timeout=-1),
], ids=["duplicates", "too-many", "negative", "fractional", "negative-timeout"])
def test_wait_with_bad_arguments_is_a_value_error(call):
    refs = [double.remote(1), double.remote(2)]
    with pytest.raises(ValueError):
        call(refs)
    assert_runtime_still_works()


def test_wait_on_something_that_is_not_a_list_of_refs_is_a_type_error():
    ref = double.remote(1)
    with pytest.raises(TypeError):
        skate.wait(ref)
    with pytest.raises(TypeError):
        skate.wait([ref, 3])
    assert_runtime_still_works()
