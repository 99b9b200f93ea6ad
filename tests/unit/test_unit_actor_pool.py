"""The no-row-lost check every model pass shares."""

from __future__ import annotations

import pandas as pd
import pytest

from compeffdist_ray.actor_pool import RowsLost, in_input_order
from compeffdist_ray.stages._common import StageFailed


def test_output_comes_back_in_input_order():
    frame = pd.DataFrame({"key": ["b", "a", "c"]})
    out = pd.DataFrame({"key": ["a", "c", "b"], "y": [1, 3, 2]})
    assert list(in_input_order(frame, out, "key", "x")["y"]) == [2, 1, 3]


@pytest.mark.parametrize("keys, message", [
    (["a", "b"], "3 rows in, 2 out (1 lost, e.g. ['c']"),
    (["a", "b", "c", "c"], "3 rows in, 4 out (0 lost"),
    (["a", "b", "b"], "3 rows in, 3 out (1 lost, e.g. ['c']; 1 unexpected or repeated)"),
])
def test_lost_or_repeated_rows_fail_the_stage(keys, message):
    frame = pd.DataFrame({"key": ["a", "b", "c"]})
    with pytest.raises(RowsLost, match=r"^scoring: ") as err:
        in_input_order(frame, pd.DataFrame({"key": keys}), "key", "scoring")
    assert message in str(err.value) and isinstance(err.value, StageFailed)
