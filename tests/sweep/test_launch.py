"""Worker processes share the machine's cores instead of each taking all of them."""

from __future__ import annotations

import os

from moeplat.sweep.launch import worker_env


def test_workers_split_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_env(4)["OMP_NUM_THREADS"] == "4"
    assert worker_env(32)["OMP_NUM_THREADS"] == "1"


def test_a_users_thread_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(2)["OMP_NUM_THREADS"] == "3"
