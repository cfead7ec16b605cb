"""Continual-learning metrics over a score matrix (spec §8). Pure, stateless, numpy only.

``scores[j][i]`` is the score on task ``i``'s test set after training through task ``j``
(0-based here; the spec counts from 1). The matrix is ``T x T``; entries *above* the diagonal
(``i > j``: tasks not trained yet) are never used and may be NaN. ``None`` is read as NaN.
All results are on the same scale as the scores (0-1 in this project) and are plain Python floats.

* ``OP``  = mean_i scores[T-1][i]
* ``BWT`` = sum_{i<T-1} (scores[T-1][i] - scores[i][i]) / (T-1)   (``bwt_denominator="T"``: / T)
* ``FWT`` = mean_i (scores[i][i] - single[i]), ``single[i]`` = a LoRA trained on task i alone
* ``forgetting`` = mean_{i<T-1} (max_{i<=j<T-1} scores[j][i] - scores[T-1][i])

Decisions (documented, tested):

* Forgetting takes the max over the rows *after* task i was learned (``i <= j < T-1``); the upper
  triangle is ignored even when it holds numbers (zero-shot scores before training are not
  knowledge that can be forgotten). With an all-NaN upper triangle this is exactly the spec's
  ``max_{j<T}``.
* ``T == 1``: BWT and forgetting average over an empty set and are ``float('nan')`` (not 0.0:
  there is no earlier task, so there is nothing to report). OP and FWT are defined.
* A NaN where a metric needs a value raises ``ValueError`` naming the entries. The release
  evaluates only the diagonal and the last row; such a matrix gives OP, BWT and FWT, and
  forgetting only with ``allow_partial=True`` (then the max runs over the rows that are present,
  which is a lower bound of the true forgetting).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BWT_DENOMINATORS = ("T-1", "T")


def as_matrix(scores) -> np.ndarray:
    """``scores`` as a float ``T x T`` array (None -> NaN); ValueError unless square and T >= 1."""
    try:
        arr = np.array(scores, dtype=float)
    except (TypeError, ValueError) as exc:  # ragged lists, strings, ...
        raise ValueError(f"scores must be a T x T matrix of numbers: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"scores must be a square T x T matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("scores is empty (T = 0)")
    return arr


def _require(arr: np.ndarray, cells: list[tuple[int, int]], what: str) -> None:
    missing = [(j, i) for j, i in cells if np.isnan(arr[j, i])]
    if missing:
        shown = ", ".join(f"scores[{j}][{i}]" for j, i in missing[:6])
        more = f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""
        raise ValueError(f"{what} needs {shown}{more}, which is NaN/missing")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def op(scores) -> float:
    """Overall performance: mean score over all tasks after training through the last task."""
    arr = as_matrix(scores)
    t = arr.shape[0]
    _require(arr, [(t - 1, i) for i in range(t)], "OP")
    return float(np.mean(arr[t - 1]))


def bwt(scores, bwt_denominator: str = "T-1") -> float:
    """Backward transfer: sum_{i<T-1}(scores[T-1][i] - scores[i][i]) / (T-1) (or / T).

    Negative means forgetting. NaN when T == 1.
    """
    if bwt_denominator not in BWT_DENOMINATORS:
        raise ValueError(f"bwt_denominator must be one of {BWT_DENOMINATORS}, got {bwt_denominator!r}")
    arr = as_matrix(scores)
    t = arr.shape[0]
    if t == 1:
        return float("nan")
    earlier = range(t - 1)
    _require(arr, [(i, i) for i in earlier] + [(t - 1, i) for i in earlier], "BWT")
    total = float(sum(arr[t - 1, i] - arr[i, i] for i in earlier))
    return total / (t - 1 if bwt_denominator == "T-1" else t)


def fwt(scores, single_task: Sequence[float]) -> float:
    """Forward transfer as in spec §8: mean_i (scores[i][i] - single_task[i])."""
    arr = as_matrix(scores)
    t = arr.shape[0]
    single = np.array(single_task, dtype=float).reshape(-1) if single_task is not None else None
    if single is None or single.shape[0] != t:
        got = "None" if single is None else str(single.shape[0])
        raise ValueError(f"single_task must hold one score per task ({t}), got {got}")
    if np.isnan(single).any():
        raise ValueError(f"single_task has NaN at task(s) {np.flatnonzero(np.isnan(single)).tolist()}")
    _require(arr, [(i, i) for i in range(t)], "FWT")
    return float(np.mean(np.diag(arr) - single))


def forgetting(scores, *, allow_partial: bool = False) -> float:
    """Average forgetting: mean_{i<T-1} (max_{i<=j<T-1} scores[j][i] - scores[T-1][i]).

    Needs the whole lower triangle (diagonal included); with ``allow_partial=True`` only the
    diagonal and the last row are required and the max runs over the rows present (lower bound).
    NaN when T == 1.
    """
    arr = as_matrix(scores)
    t = arr.shape[0]
    if t == 1:
        return float("nan")
    earlier = range(t - 1)
    needed = [(t - 1, i) for i in earlier] + [(i, i) for i in earlier]
    if not allow_partial:
        needed += [(j, i) for i in earlier for j in range(i + 1, t - 1)]
    _require(arr, needed, "forgetting")
    drops = [float(np.nanmax(arr[i : t - 1, i]) - arr[t - 1, i]) for i in earlier]
    return _mean(drops)


def task1_curve(scores) -> list[float]:
    """Score on the first task after training through each task j (column 0)."""
    arr = as_matrix(scores)
    t = arr.shape[0]
    _require(arr, [(j, 0) for j in range(t)], "task1_curve")
    return [float(x) for x in arr[:, 0]]


def seen_average_curve(scores) -> list[float]:
    """Mean score over the tasks seen so far after each task j: mean_{i<=j} scores[j][i]."""
    arr = as_matrix(scores)
    t = arr.shape[0]
    _require(arr, [(j, i) for j in range(t) for i in range(j + 1)], "seen_average_curve")
    return [float(np.mean(arr[j, : j + 1])) for j in range(t)]


def cl_metrics(
    scores,
    single_task: Sequence[float] | None = None,
    bwt_denominator: str = "T-1",
    *,
    allow_partial: bool = False,
) -> dict[str, float | None]:
    """All of spec §8 at once: ``{"OP", "BWT", "FWT", "forgetting"}``.

    ``FWT`` is None without ``single_task``. BWT and forgetting are NaN when T == 1.
    """
    arr = as_matrix(scores)
    return {
        "OP": op(arr),
        "BWT": bwt(arr, bwt_denominator),
        "FWT": None if single_task is None else fwt(arr, single_task),
        "forgetting": forgetting(arr, allow_partial=allow_partial),
    }


def run_metrics(scores, *, joint: bool = False, single_task: bool = False) -> dict:
    """The numbers of a complete run's ``metrics.json``, by the kind of method.

    ``joint`` (one stage over all tasks, a 1 x T matrix): ``{"OP"}``, the mean of the row.
    ``single_task`` (a fresh adapter per task, only the diagonal evaluated):
    ``{"single_task": [diagonal], "OP": its mean}``. Otherwise :func:`cl_metrics`. The two
    means are plain sums in task order divided by T (as every version wrote them).
    """
    rows = [[float(x) for x in row] for row in scores]
    t = len(rows[-1])
    if joint:
        return {"OP": sum(rows[-1]) / t}
    if single_task:
        diagonal = [rows[j][j] for j in range(t)]
        return {"single_task": diagonal, "OP": sum(diagonal) / t}
    return cl_metrics(rows)
