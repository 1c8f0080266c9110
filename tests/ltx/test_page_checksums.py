"""PageChecksums: incremental database checksums equal a full recomputation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import ltx
from ltx import PageChecksums


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 12),  # new commit size
            st.dictionaries(st.integers(1, 12), st.integers(0, 255), max_size=6),
        ),
        max_size=8,
    )
)
def test_updates_and_predictions_equal_a_full_recomputation(
    steps: list[tuple[int, dict[int, int]]],
) -> None:
    page_size = 512
    image: dict[int, bytes] = {}
    sums = PageChecksums(page_size)
    for commit, fills in steps:
        pages = {p: bytes([f]) * page_size for p, f in fills.items() if p <= commit}
        for pgno in [p for p in image if p > commit]:
            del image[pgno]
        for pgno in range(1, commit + 1):
            image.setdefault(pgno, bytes(page_size))  # a growth gap reads back as zeros
        image.update(pages)
        changed = {p: ltx.page_checksum(p, data) for p, data in pages.items()}
        predicted = sums.after(changed, commit)
        sums.update(changed, commit)
        expected = ltx.database_checksum(sorted(image.items())) if image else ltx.EMPTY_DB_CHECKSUM
        assert sums.pages == commit
        assert sums.checksum() == predicted == expected


def test_of_pages_equals_database_checksum_and_skips_the_lock_page() -> None:
    page_size = 4096
    lock = ltx.lock_pgno(page_size)
    pages = [(p, bytes([p % 251]) * page_size) for p in (1, 2, lock - 1, lock, lock + 1)]
    sums = PageChecksums.of_pages(page_size, pages)
    assert sums[lock] == 0
    assert sums.checksum() == ltx.database_checksum(pages)
    copy = sums.copy()
    copy.set(1, 0)
    assert sums.checksum() == ltx.database_checksum(pages)  # the copy is independent
