"""scikit-learn on skate's joblib backend gives the same results as a serial run.

    python compat/run_sklearn_check.py

For each of ``GridSearchCV``, ``cross_val_score`` and ``RandomForestClassifier(n_jobs=2)``
on datasets shipped with scikit-learn (digits, iris), the script fits once serially
(``n_jobs=1``) and once with ``n_jobs=2`` inside ``parallel_config(backend="skate")``,
with the same ``random_state``, and compares what the estimators expose: scores, the
chosen parameters, predictions, probabilities and feature importances must be equal
(exactly; the work is the same, only where it runs differs). It also counts the batches
the skate backend sent, so a check cannot pass by silently running serially.

Prints one line per check and exits non-zero if any differs. The times printed are for
information only: the first call on skate includes the workers importing scikit-learn.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from joblib import parallel_config
from sklearn.datasets import load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.svm import SVC

import skate
import skate.joblib


class _SubmitCounter:
    """Counts the batches SkateBackend sends while active."""

    def __init__(self):
        self.count = 0
        self._orig = skate.joblib.SkateBackend.submit

    def __enter__(self):
        counter = self

        def submit(backend, func, callback=None):
            counter.count += 1
            return counter._orig(backend, func, callback)
        skate.joblib.SkateBackend.submit = submit
        return self

    def __exit__(self, *exc):
        skate.joblib.SkateBackend.submit = self._orig


def _on_skate(fn):
    """``fn()`` with joblib on skate; returns (result, batches sent to skate)."""
    with _SubmitCounter() as counter, parallel_config(backend="skate"):
        result = fn()
    return result, counter.count


def grid_search(n_jobs):
    X, y = load_digits(return_X_y=True)
    search = GridSearchCV(SVC(), {"C": [0.1, 1.0, 10.0], "gamma": [1e-4, 1e-3, 1e-2]},
                          cv=KFold(4, shuffle=True, random_state=0), n_jobs=n_jobs)
    search.fit(X, y)
    return {"best_params": search.best_params_, "best_score": search.best_score_,
            "mean_test_score": search.cv_results_["mean_test_score"],
            "rank": search.cv_results_["rank_test_score"],
            "predict": search.predict(X)}


def cross_val(n_jobs):
    X, y = load_iris(return_X_y=True)
    model = RandomForestClassifier(n_estimators=30, random_state=0)
    return {"scores": cross_val_score(model, X, y, cv=KFold(5, shuffle=True, random_state=1),
                                      n_jobs=n_jobs)}


def random_forest(n_jobs):
    X, y = load_digits(return_X_y=True)
    model = RandomForestClassifier(n_estimators=60, random_state=0, n_jobs=n_jobs).fit(X, y)
    return {"predict_proba": model.predict_proba(X), "feature_importances": model.feature_importances_,
            "n_nodes": [est.tree_.node_count for est in model.estimators_]}


CHECKS = {"GridSearchCV(SVC) on digits": grid_search,
          "cross_val_score(RandomForestClassifier) on iris": cross_val,
          "RandomForestClassifier(n_jobs=2) on digits": random_forest}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (np.ndarray, list, tuple)):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return a == b


def run_checks() -> list:
    """``[(name, same, batches sent to skate, serial s, skate s)]``."""
    rows = []
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        serial = fn(1)
        t1 = time.perf_counter()
        parallel, batches = _on_skate(lambda: fn(2))
        t2 = time.perf_counter()
        rows.append((name, _same(serial, parallel), batches, t1 - t0, t2 - t1))
    return rows


def main() -> int:
    skate.init(num_cpus=2)
    try:
        rows = run_checks()
    finally:
        skate.shutdown()
    ok = True
    for name, same, batches, t_serial, t_skate in rows:
        good = same and batches > 0
        ok &= good
        print(f"{'OK  ' if good else 'FAIL'} {name}: {'equal to' if same else 'DIFFERS from'} serial; "
              f"{batches} batches on skate; serial {t_serial:.2f} s, skate {t_skate:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
