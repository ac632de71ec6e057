"""experiments/crosscheck/reference.py without a reference checkout: it says what it needs in
one line (the side-by-side runs themselves need LAMDA-PILOT, which the tests do not fetch), and
the data it serves PILOT's learners is the toolkit's, in the toolkit's class order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from conftest import script_in_fork

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "crosscheck" / "reference.py"


def test_without_a_reference_checkout_it_says_what_it_needs(tmp_path):
    err = tmp_path / "stderr"
    assert script_in_fork(SCRIPT, stderr=err) == 2
    assert "--pilot-root must name a checkout of LAMDA-PILOT" in err.read_text()
    assert script_in_fork(SCRIPT, "--pilot-root", str(tmp_path), stderr=err) == 2


def test_pilots_data_are_the_toolkits_digits_in_its_class_order():
    sys.path.insert(0, str(SCRIPT.parent))
    import reference

    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.protocol import make_class_split

    manager = reference.DigitsManager(1994)
    cfg, _ = load_config("digits_b0_5steps", ["seed=1994", "protocol.order_seed=1994"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    order = make_class_split(cfg.protocol, 10, 1994).class_order
    assert [manager.get_task_size(t) for t in range(manager.nb_tasks)] == [2] * 5
    first = manager.get_dataset(np.arange(0, 2), source="test", mode="test")
    expected = [i for i, t in enumerate(splits.test.targets) if int(t) in order[:2]]
    assert len(first) == len(expected) and set(first.labels.tolist()) == {0, 1}
    index, image, label = first[0]
    torch.testing.assert_close(image, splits.eval_transform(splits.test[expected[0]][0]))
    assert order[label] == int(splits.test.targets[expected[0]])
