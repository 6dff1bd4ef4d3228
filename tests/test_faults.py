"""Interrupted migrations and key rotations lose nothing: SIGKILL, a killed backend, a crash.

Each scenario in ``FAULT_SCENARIOS`` is a resumable command. It is killed at
``KILL_POINTS`` progress thresholds spread over its run, each time on a fresh
copy (``CREATE DATABASE ... TEMPLATE``) of one seeded database, then run
again: afterwards every row decrypts to its expected value and no row is
missing or added.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from princeps_db.crypto import generate_master_key
from princeps_db.pgserver import LocalPostgres
from tests.conftest import TEST_KEY
from tests.security_support import (
    FaultScenario,
    Tokens,
    alembic_head,
    backfill_scenario,
    count,
    create_database,
    decrypt_all_at_once,
    drop_database,
    rerun_to_completion,
    rotation_scenario,
    sigkill,
    started,
    terminate_backend,
    wait_for_progress,
)

KILL_POINTS = 12
FAULT_SCENARIOS = [
    backfill_scenario(rows=2000, batch_size=20, key_text=TEST_KEY),
    rotation_scenario(
        rows=2000, batch_size=20, old_key_text=TEST_KEY, new_key_text=generate_master_key()
    ),
]
"""Every scenario is killed at the same points; a new resumable command joins with one entry."""

HEAD = alembic_head()


def _version(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            version: str = connection.execute(
                sa.text("SELECT coalesce(max(version_num), '') FROM alembic_version")
            ).scalar_one()
    finally:
        engine.dispose()
    return version


@pytest.fixture(scope="module")
def templates(local_postgres: LocalPostgres) -> Iterator[dict[str, Tokens]]:
    """Each scenario's starting database, built once, keyed by template name."""
    built: dict[str, Tokens] = {}
    for number, scenario in enumerate(FAULT_SCENARIOS):
        name = f"faults_template_{number}"
        built[name] = scenario.build(create_database(local_postgres, name))
    yield built
    for name in built:
        drop_database(local_postgres, name)


def _finished(scenario: FaultScenario, url: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return bool(connection.execute(sa.text(scenario.finished_sql)).scalar_one())
    finally:
        engine.dispose()


def _assert_nothing_lost(scenario: FaultScenario, url: str, expected: Tokens) -> None:
    result = rerun_to_completion(scenario, url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _finished(scenario, url)
    assert _version(url) == HEAD
    assert count(url, 'SELECT count(*) FROM "Integration"') == len(expected)
    assert decrypt_all_at_once(url, scenario.keyring_after) == expected


POINTS = [
    (number, scenario, point)
    for number, scenario in enumerate(FAULT_SCENARIOS)
    for point in scenario.kill_points(KILL_POINTS)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("number", "scenario", "threshold"),
    POINTS,
    ids=[f"{s.name.split()[0]}-at-{p}-of-{s.total}" for _, s, p in POINTS],
)
def test_sigkill_at_any_point_then_rerun_loses_nothing(
    local_postgres: LocalPostgres,
    templates: dict[str, Tokens],
    number: int,
    scenario: FaultScenario,
    threshold: int,
) -> None:
    template = f"faults_template_{number}"
    url = create_database(local_postgres, f"faults_kill_{threshold}", template=template)
    with started(scenario, url) as process:
        reached = wait_for_progress(scenario, url, process, threshold)
        sigkill(process)
    assert reached >= threshold
    assert not _finished(scenario, url), "the command finished before it was killed"
    _assert_nothing_lost(scenario, url, templates[template])


def test_kill_points_are_spread_over_the_whole_run() -> None:
    for scenario in FAULT_SCENARIOS:
        points = scenario.kill_points(KILL_POINTS)
        assert len(set(points)) == KILL_POINTS >= 10
        assert points[0] <= scenario.total // 10
        assert points[-1] >= scenario.total * 9 // 10


@pytest.mark.slow
@pytest.mark.parametrize(
    ("number", "scenario"),
    list(enumerate(FAULT_SCENARIOS)),
    ids=[s.name.split()[0] for s in FAULT_SCENARIOS],
)
def test_a_backend_terminated_mid_batch_then_rerun_loses_nothing(
    local_postgres: LocalPostgres,
    templates: dict[str, Tokens],
    number: int,
    scenario: FaultScenario,
) -> None:
    template = f"faults_template_{number}"
    url = create_database(local_postgres, f"faults_terminated_{number}", template=template)
    with started(scenario, url) as process:
        wait_for_progress(scenario, url, process, scenario.total // 2)
        assert terminate_backend(local_postgres, scenario.application_name) >= 1
        assert process.wait(timeout=60) != 0
    assert not _finished(scenario, url)
    _assert_nothing_lost(scenario, url, templates[template])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", FAULT_SCENARIOS, ids=lambda s: s.name.split()[0])
def test_the_server_crashing_mid_run_then_rerun_loses_nothing(scenario: FaultScenario) -> None:
    with LocalPostgres() as server:
        url = create_database(server, "crash")
        expected = scenario.build(url)
        with started(scenario, url) as process:
            wait_for_progress(scenario, url, process, scenario.total // 3)
            server.restart(mode="immediate")
            assert process.wait(timeout=60) != 0
        assert not _finished(scenario, url)
        _assert_nothing_lost(scenario, url, expected)
