"""Fixtures of the benchmark suite (``python -m fastlla bench`` runs it; see fastlla/apps/bench.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def pytest_configure(config):
    torch.set_num_threads(int(benchlib.config().get("threads", 2)))


@pytest.fixture(scope="session")
def cfg():
    return benchlib.config()


@pytest.fixture(scope="session")
def budget(cfg):
    deadline = os.environ.get("FASTLLA_BENCH_DEADLINE")
    return benchlib.Budget(cfg.get("budgets", {}), float(deadline) if deadline else None)


@pytest.fixture(scope="session")
def digits_flat():
    return benchlib.digits(flat=True)


@pytest.fixture(scope="session")
def digits_img():
    return benchlib.digits(flat=False)


def pytest_sessionfinish(session, exitstatus):
    path = os.path.join(benchlib.out_dir(), "sessions.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"exitstatus": int(exitstatus), "argv": sys.argv[1:]}) + "\n")
