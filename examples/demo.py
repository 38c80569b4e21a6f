"""The skate demo: tasks, objects in shared memory, nested tasks and errors.

Runs on the embedded default cluster (skate.init() with no address): a GCS and one node
manager started for this script, gone when it ends.
"""

import time

import numpy as np

import skate


@skate.remote
def double(x):
    return 2 * x


@skate.remote
def mean_of(arr):
    return float(arr.mean())


@skate.remote
def fib(n):
    # Nested tasks: a worker blocked in get() lends its CPU back, so this cannot deadlock.
    if n < 2:
        return n
    return sum(skate.get([fib.remote(n - 1), fib.remote(n - 2)]))


@skate.remote
def fails():
    raise ValueError("something went wrong inside a task")


def main():
    t0 = time.perf_counter()
    skate.init()
    print(f"cluster: {skate.cluster_resources()}")
    print("first result:", skate.get(double.remote(21)), f"({time.perf_counter() - t0:.3f} s after init)")

    t = time.perf_counter()
    values = skate.get([double.remote(i) for i in range(1000)])
    print(f"1000 tasks -> {values[:5]}... in {time.perf_counter() - t:.3f} s")

    big = np.random.default_rng(0).random(10**7)           # 80 MB
    ref = skate.put(big)                                    # into shared memory, once
    view = skate.get(ref)                                   # zero-copy, read-only view
    print(f"put/get 80 MB: same values {np.array_equal(view, big)}, writeable={view.flags.writeable}")
    print("mean computed by a task reading shared memory:", round(skate.get(mean_of.remote(ref)), 6))

    print("fib(10) with nested tasks:", skate.get(fib.remote(10)))

    ready, pending = skate.wait([double.remote(i) for i in range(20)], num_returns=10, timeout=5.0)
    print(f"wait: {len(ready)} ready, {len(pending)} pending")

    try:
        skate.get(fails.remote())
    except ValueError as e:  # also a skate.exceptions.TaskError, with the remote traceback
        print("the task's ValueError came back:", str(e).splitlines()[-1])

    skate.shutdown()
    print("shut down: no process and no shared-memory segment left")


if __name__ == "__main__":
    main()
