"""The attributes websockets sets on a connection after ``__init__``.

On CPython 3.11 and 3.12 the instances of a class share one table of attribute names,
and every new instance shrinks what that table may still take. websockets' asyncio
connection stores its last two attributes in ``connection_made``, which runs after the
event loop has accepted the whole burst of connections that arrived at once: when a
server's first burst is large enough, the table is exhausted before those names reach
it, and from then on every connection of that class gets a combined dict of its own,
about +1.5 KiB each for the life of the process. A bare server meets that race or not
at random, depending on how its first clients arrive.

The connection classes ``serve()`` makes assign these names (to ``None``) at the end of
``__init__``, so that the first instance puts every name in the table at once: the
same keys in the same order as the bare server's, and the same memory every time.
"""

from __future__ import annotations

import dis
import types

__all__ = ["late_attributes"]

#: Opcodes that push a local variable (``self``), CPython 3.11 to 3.14.
_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"})
#: Superinstructions that push two locals, ``self`` last (CPython 3.13+).
_LOADS_TWO = frozenset({"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"})


def late_attributes(base: type, method: str = "connection_made") -> tuple[str, ...]:
    """Names ``method`` assigns on ``self`` in ``base``'s MRO and no ``__init__`` does.

    Read from the bytecode (``self.name = ...``). Left out: names that are class
    attributes anywhere in the MRO (a property, a class-level default), which an
    instance attribute must not shadow. Never raises; empty when nothing is found.
    """
    late: dict[str, None] = {}
    early: set[str] = set()
    for klass in base.__mro__:
        early.update(_assigned_on_self(vars(klass).get("__init__")))
        late.update(dict.fromkeys(_assigned_on_self(vars(klass).get(method))))
    defined = {name for klass in base.__mro__ for name in vars(klass)}
    return tuple(name for name in late if name not in early and name not in defined)


def _assigned_on_self(function: object) -> list[str]:
    """``name`` of each ``self.name = ...`` in ``function`` (not in nested functions)."""
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType) or not code.co_argcount:
        return []
    if code.co_varnames[0] != "self":
        return []
    found = []
    previous: dis.Instruction | None = None
    for instruction in dis.get_instructions(code):
        if instruction.opname == "STORE_ATTR" and previous is not None:
            pushed = previous.argval
            if (previous.opname in _LOADS and pushed == "self") or (
                previous.opname in _LOADS_TWO and isinstance(pushed, tuple) and pushed[-1] == "self"
            ):
                found.append(instruction.argval)
        previous = instruction
    return found
