"""RecBole 1.2.1 on today's stack (recbole_popprior/compat.py): numpy 2, pandas, the collector bug,
anomaly detection. The checkpoint shim has its own file, tests/test_checkpoint.py."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_popprior import compat
from recbole_popprior.config import Config

from conftest import tiny_config, write_inter


def test_numpy_2_is_what_ci_runs():
    # The issue asks that the numpy 2 path is exercised in CI.
    assert int(np.__version__.split(".")[0]) >= 2


def test_config_builds_under_numpy_2_and_sets_recbole_aliases(tiny_data):
    config = Config("SASRec", "tiny", config_dict=tiny_config(tiny_data))
    assert config["model"] == "SASRec"
    # RecBole's metrics and layers use these old aliases.
    assert np.float is np.float64 and np.bool is np.bool_ and np.long is np.int_


def test_plain_recbole_config_is_broken_on_numpy_2_so_the_shim_matters():
    from recbole.config import Config as RecBoleConfig

    with pytest.raises(AttributeError):
        RecBoleConfig.compatibility_settings(None)


def test_ray_is_never_imported():
    code = ("import sys, recbole_popprior, recbole_popprior.quick_start, recbole_popprior.cli;"
            "print('ray' in sys.modules or 'recbole.quick_start' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pandas_is_pinned_below_3():
    assert int(pd.__version__.split(".")[0]) < 3


def test_recbole_fills_missing_floats(tmp_path):
    # pandas 3 copy-on-write would make RecBole's in-place fillna a no-op and leave NaN here.
    write_inter(tmp_path / "holes" / "holes.inter",
                [(u, i, 100 * u + i, "" if (u + i) % 3 == 0 else 1.5) for u in range(1, 8) for i in range(1, 6)],
                header="user_id:token\titem_id:token\ttimestamp:float\tweight:float")
    config = Config("SASRec", "holes", config_dict=tiny_config(tmp_path, load_col=None, fast_loader=False,
                                                            sequence_data="recbole"))  # RecBole's own fillna
    from recbole_popprior.data import create_dataset

    dataset = create_dataset(config)
    weights = dataset.inter_feat["weight"].to_numpy()
    assert not np.isnan(weights).any()


def test_fixed_collector_leaves_counters_alone(tiny_data):
    config = Config("SASRec", "tiny", config_dict=tiny_config(tiny_data))
    collector = compat.FixedCollector(config)
    collector.data_struct.set("data.count_items", Counter({1: 3, 2: 1}))
    collector.data_struct.set("rec.items", torch.ones(2, 3))
    struct = collector.get_data_struct()
    assert struct.get("data.count_items") == Counter({1: 3, 2: 1})
    assert "rec.items" not in collector.data_struct  # reset after each evaluation, as upstream


def test_looking_up_a_model_leaves_anomaly_detection_off():
    # RecBole's sine.py switches torch anomaly detection on at import (2-3x slower training).
    from recbole_popprior.model import get_model

    torch.autograd.set_detect_anomaly(True)
    get_model("SINE")
    assert not torch.is_anomaly_enabled()
    code = "import torch, recbole_popprior.model as m; m.get_model('SASRec'); print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
