"""Admin traffic is kept apart from the decision path: its own Postgres pool with a
statement timeout, bounded pages."""

from __future__ import annotations

import asyncpg
import pytest

from sira_server.api.lifecycle import MAX_PAGE_SIZE, _page_size
from sira_server.app import open_stores
from sira_server.errors import InvalidArgument
from sira_server.limit_settings import LimitSettings


async def test_admin_pool_is_separate_and_times_out(database_url: str, redis_url: str) -> None:
    stores = await open_stores(
        database_url, redis_url, LimitSettings(admin_pool_size=2, admin_statement_timeout_ms=200)
    )
    try:
        assert stores.admin_pool is not None
        assert stores.admin_pool is not stores.pool
        assert await stores.admin_pool.fetchval("SHOW statement_timeout") == "200ms"
        assert await stores.pool.fetchval("SHOW statement_timeout") == "0"
        with pytest.raises(asyncpg.QueryCanceledError):
            await stores.admin_pool.fetchval("SELECT pg_sleep(5)")
        assert stores.admin_pool.get_max_size() == 2
    finally:
        await stores.close()


@pytest.mark.parametrize(
    ("given", "expected"), [(0, 50), (1, 1), (100, 100), (101, MAX_PAGE_SIZE), (1000, 100)]
)
def test_pages_are_coerced_to_the_maximum(given: int, expected: int) -> None:
    assert _page_size(given, 50) == expected


def test_out_of_range_page_sizes_are_still_invalid() -> None:
    with pytest.raises(InvalidArgument):
        _page_size(-1, 50)
