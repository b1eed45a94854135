"""SizedOrderedDict: its running total always equals the sum of its values' sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter_store.sized import SizedOrderedDict

KEYS = st.sampled_from("abcdef")
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, st.integers(0, 1000)),
        st.tuples(st.just("del"), KEYS, st.none()),
        st.tuples(st.just("pop"), KEYS, st.none()),
        st.tuples(st.just("popitem"), st.booleans(), st.none()),
        st.tuples(st.just("move"), KEYS, st.none()),
        st.tuples(st.just("update"), KEYS, st.integers(0, 1000)),
        st.tuples(st.just("setdefault"), KEYS, st.integers(0, 1000)),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=40,
)


@given(OPS)
def test_the_total_follows_every_mutation(ops: list[tuple[str, object, object]]) -> None:
    sized: SizedOrderedDict[str, int] = SizedOrderedDict(lambda size: size)
    plain: dict[str, int] = {}
    for op, key, value in ops:
        if op == "set":
            sized[key], plain[key] = value, value  # type: ignore[index, assignment]
        elif op == "update":
            sized.update({key: value})  # type: ignore[dict-item]
            plain.update({key: value})  # type: ignore[dict-item]
        elif op == "setdefault":
            assert sized.setdefault(key, value) == plain.setdefault(key, value)  # type: ignore[call-overload, arg-type]
        elif op in ("del", "pop", "move") and key not in plain:
            with pytest.raises(KeyError):
                {"del": sized.__delitem__, "pop": sized.pop, "move": sized.move_to_end}[op](key)
            assert sized.pop(key, None) is None  # type: ignore[arg-type]
        elif op == "del":
            del sized[key], plain[key]  # type: ignore[arg-type]
        elif op == "pop":
            assert sized.pop(key) == plain.pop(key)  # type: ignore[arg-type]
        elif op == "move":
            sized.move_to_end(key)  # type: ignore[arg-type]
        elif op == "popitem":
            if not plain:
                with pytest.raises(KeyError):
                    sized.popitem()
                continue
            gone, size = sized.popitem(last=bool(key))
            assert plain.pop(gone) == size
        else:
            sized.clear()
            plain.clear()
        assert dict(sized) == plain
        assert sized.total == sum(plain.values())
