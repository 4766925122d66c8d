"""The SRAM allocator: first-fit offsets, validation, capacity errors, occupancy."""

import numpy as np
import pytest

import wafer
from wafer.memory import Allocation, MemoryMap, Rect, words_for

# A 4 x 6 grid with 16 words (64 bytes) per core keeps every layout small enough to check by hand.
ROWS, COLS, CAP = 4, 6, 64


def empty():
    return MemoryMap(ROWS, COLS, CAP)


@pytest.mark.parametrize(
    "shape,dtype,words",
    [((3,), "float32", 3), ((3,), "float16", 2), ((4,), "bfloat16", 2), ((5,), "int8", 2), ((), "float32", 1)],
    ids=["f32x3", "f16x3", "bf16x4", "i8x5", "scalar"],
)
def test_words_round_up_to_whole_words(shape, dtype, words):
    assert words_for(shape, dtype) == words
    m = empty().allocate("a", Rect(0, 0, 1, 1), shape, dtype)
    assert m["a"].words == words and m["a"].nbytes == 4 * words


def test_first_fit_offsets():
    m = empty().allocate("a", Rect(0, 0, 2, 2), (3,))
    assert m["a"].offset == 0 and m["a"].end == 3
    # Overlapping rectangles stack.
    m = m.allocate("b", Rect(1, 1, 2, 2), (4,))
    assert m["b"].offset == 3
    m = m.allocate("c", (1, 0, 1, 3), (2,))  # 4-tuple accepted; overlaps a and b
    assert m["c"].offset == 7
    assert isinstance(m["c"].rect, Rect)
    # A rectangle overlapping nothing starts at word 0 again.
    m = m.allocate("d", Rect(0, 4, 4, 2), (5,))
    assert m["d"].offset == 0
    # Only the allocations whose rectangles overlap matter: e overlaps b alone.
    m = m.allocate("e", Rect(2, 2, 2, 2), (1,))
    assert m["e"].offset == 0
    assert m.names == ("a", "b", "c", "d", "e")


def test_first_fit_reuses_gap_after_free():
    m = empty().allocate("a", Rect(0, 0, 2, 2), (3,)).allocate("b", Rect(0, 0, 2, 2), (4,))
    assert m["b"].offset == 3
    m = m.free("a")
    # 2 words fit in the freed gap [0, 3); 4 words do not and go after b.
    assert m.allocate("small", Rect(0, 0, 1, 1), (2,))["small"].offset == 0
    assert m.allocate("big", Rect(0, 0, 1, 1), (4,))["big"].offset == 7


def test_explicit_offset():
    m = empty().allocate("a", Rect(0, 0, 2, 2), (4,))
    m = m.allocate("b", Rect(1, 1, 2, 2), (2,), offset=8)
    assert m["b"].offset == 8
    # Explicit offsets are honoured on disjoint rectangles even where first fit would pick another.
    assert m.allocate("c", Rect(3, 3, 1, 1), (2,), offset=5)["c"].offset == 5
    # Filling the gap [4, 8) exactly is fine.
    assert m.allocate("g", Rect(1, 1, 1, 1), (4,), offset=4)["g"].offset == 4


@pytest.mark.parametrize("offset,other", [(0, "a"), (3, "a"), (6, "b"), (9, "b")], ids=["a0", "a3", "b6", "b9"])
def test_explicit_offset_overlap_raises(offset, other):
    m = empty().allocate("a", Rect(0, 0, 2, 2), (4,)).allocate("b", Rect(1, 1, 2, 2), (2,), offset=8)
    with pytest.raises(ValueError, match=rf"'new'.*overlaps allocation '{other}'"):
        m.allocate("new", Rect(1, 1, 1, 1), (3,), offset=offset)


def test_negative_offset_raises():
    with pytest.raises(ValueError, match="offset"):
        empty().allocate("a", Rect(0, 0, 1, 1), (1,), offset=-1)


@pytest.mark.parametrize(
    "rect",
    [Rect(3, 0, 2, 2), Rect(0, 5, 1, 2), Rect(-1, 0, 1, 1), Rect(0, -1, 1, 1), Rect(0, 0, 0, 1), Rect(0, 0, 1, 0)],
    ids=["past-bottom", "past-right", "neg-row", "neg-col", "zero-height", "zero-width"],
)
def test_rect_outside_grid_raises(rect):
    with pytest.raises(ValueError, match=r"not inside the 4x6 core grid"):
        empty().allocate("a", rect, (1,))


def test_duplicate_name_raises():
    m = empty().allocate("w", Rect(0, 0, 1, 1), (1,))
    with pytest.raises(ValueError, match="'w' already exists"):
        m.allocate("w", Rect(2, 2, 1, 1), (1,))


def test_negative_shape_raises():
    with pytest.raises(ValueError, match="non-negative"):
        empty().allocate("a", Rect(0, 0, 1, 1), (2, -1))


def test_capacity_error_attributes_and_message():
    m = empty().allocate("a", Rect(0, 0, 2, 2), (10,))  # 40 bytes on cores (0..1, 0..1)
    with pytest.raises(wafer.SramCapacityError) as info:
        m.allocate("big", Rect(1, 1, 2, 2), (8,))  # 32 bytes; core (1, 1) has 24 free
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.allocation, e.core, e.bytes_needed, e.bytes_free, e.capacity) == ("big", (1, 1), 32, 24, 64)
    msg = str(e)
    for part in ("'big'", "32 bytes", "(1, 1)", "24 bytes free", "capacity 64"):
        assert part in msg, (part, msg)
    assert "fragmented" not in msg


def test_capacity_error_on_empty_core():
    with pytest.raises(wafer.SramCapacityError) as info:
        empty().allocate("huge", Rect(2, 3, 1, 2), (17,))
    e = info.value
    assert (e.core, e.bytes_needed, e.bytes_free) == ((2, 3), 68, 64)
    # Exactly full fits.
    assert empty().allocate("full", Rect(2, 3, 1, 2), (16,))["full"].end == 16


def test_capacity_error_explains_fragmentation():
    m = empty().allocate("a", Rect(0, 0, 1, 1), (4,)).allocate("b", Rect(0, 1, 1, 1), (4,), offset=8)
    # Both cores have 12 words free, but no 8-word range is free on both.
    with pytest.raises(wafer.SramCapacityError, match="fragmented") as info:
        m.allocate("c", Rect(0, 0, 1, 2), (8,))
    assert info.value.bytes_needed == 32 and info.value.bytes_free == 48


def test_capacity_of_wse2_core():
    # 48 KB of SRAM less the 4 KB every core keeps for its code: 44 KB (11 x 1024 fp32 words) for data
    spec = wafer.WaferSpec.mini(2, 2)
    assert spec.data_bytes_per_core == 44 * 1024
    with pytest.raises(wafer.SramCapacityError) as info:
        wafer.init(spec).allocate("all", Rect(0, 0, 2, 2), (12 * 1024,))  # the whole 48 KB does not fit
    assert (info.value.bytes_needed, info.value.bytes_free, info.value.capacity) == (48 * 1024, 44 * 1024, 44 * 1024)
    state = wafer.init(spec).allocate("fits", Rect(0, 0, 2, 2), (11 * 1024,))  # 44 KB exactly
    assert int(state.occupancy().max()) == 44 * 1024
    with pytest.raises(wafer.SramCapacityError) as info:
        state.allocate("one_more", Rect(1, 1, 1, 1), (1,), "float16")
    assert (info.value.bytes_needed, info.value.bytes_free) == (4, 0)


def test_occupancy_and_high_water():
    m = (
        empty()
        .allocate("a", Rect(0, 0, 2, 2), (3,))
        .allocate("b", Rect(1, 1, 2, 2), (4,), "float16")  # 2 words at offset 3
        .allocate("c", Rect(3, 4, 1, 2), (5,), offset=6)
    )
    expected = np.zeros((ROWS, COLS), np.int64)
    expected[0:2, 0:2] += 12
    expected[1:3, 1:3] += 8
    expected[3, 4:6] += 20
    occ = m.occupancy()
    assert occ.dtype == np.int64 and occ.shape == (ROWS, COLS)
    np.testing.assert_array_equal(occ, expected)
    hw = np.zeros((ROWS, COLS), np.int64)
    hw[0:2, 0:2] = 3
    hw[1:3, 1:3] = 5
    hw[3, 4:6] = 11
    np.testing.assert_array_equal(m.high_water(), hw)


def test_free():
    m = empty().allocate("a", Rect(0, 0, 2, 2), (3,)).allocate("b", Rect(0, 0, 2, 2), (2,))
    freed = m.free("a")
    assert freed.names == ("b",) and "a" not in freed and "a" in m  # maps are immutable
    np.testing.assert_array_equal(freed.occupancy()[0:2, 0:2], np.full((2, 2), 8))
    assert freed.occupancy().sum() == 4 * 8
    assert freed.free("b").occupancy().sum() == 0
    with pytest.raises(KeyError, match="'nope'.*\\['a', 'b'\\]"):
        m.free("nope")
    with pytest.raises(KeyError, match="'nope'"):
        m["nope"]


def test_allocation_record():
    m = empty().allocate("t", Rect(1, 2, 2, 3), (2, 3), "float16")
    a = m["t"]
    assert a == Allocation("t", Rect(1, 2, 2, 3), 0, (2, 3), "float16")
    assert (a.words, a.nbytes, a.end, a.array_shape) == (3, 12, 3, (2, 3, 2, 3))
    assert a.rect.cores == 6 and str(a.rect) == "2x3@(1,2)"
    assert hash(m) == hash(empty().allocate("t", Rect(1, 2, 2, 3), (2, 3), "float16"))
