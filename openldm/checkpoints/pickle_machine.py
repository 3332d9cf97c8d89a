"""A pickle machine for checkpoints: the opcodes ``torch.save`` and the known Stable Diffusion
checkpoint writers emit, and nothing else, run by code of its own.

Python's unpickler is a general object builder: its BUILD opcode sets state on any object the pickle
can reach, its containers hash whatever keys they are given, its memo is a list indexed by the file,
and its errors print what they hold. Here:

* globals come only from an allowlist the caller gives (:class:`Globals`); nothing is imported;
* BUILD and NEWOBJ act only on fresh objects of this run (an ``OrderedDict`` it made, whose state is
  dropped; a metadata placeholder, which records it): nothing shared between loads can be changed by a
  file, and the placeholder types themselves are made anew for every load;
* dictionary keys and set members are strings, small integers, floats, bytes, None or placeholder
  types: no attacker-built tuple is ever hashed, and integers cannot be chosen to collide;
* the memo is a dictionary of at most :attr:`Limits.memo` entries, containers nest at most
  :attr:`Limits.depth` deep, integers and strings are bounded, and the pickle's own size bounds the
  rest (every object the stack holds came from at least one byte of it);
* errors describe what they found by type and a short, bounded excerpt (:func:`describe`).
"""

from __future__ import annotations

import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_STRUCTS: dict[str, struct.Struct] = {}
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4
_SHORT.maxtuple = 4


class PickleRejected(ValueError):
    """The pickle is malformed, exceeds a limit, or asks for something this machine does not do."""


def describe(value: Any) -> str:
    """A short, bounded description of an untrusted value, for error messages."""
    try:
        return f"{type(value).__name__} {_SHORT.repr(value)}"
    except Exception:  # a repr that fails is still described by its type
        return type(value).__name__


@dataclass(frozen=True)
class Limits:
    depth: int = 64  # containers inside containers
    memo: int = 10_000_000  # memo entries (and the largest memo index)
    string: int = 64 * 1024 * 1024  # bytes of one string or bytes object
    integer: int = 64  # bytes of one LONG1/LONG4 integer
    key_integer: int = 2**60  # dictionary keys: |k| below this (hash(k) == k, no chosen collisions)


class Placeholder:
    """Stands in for an allowlisted metadata class (Lightning's ``ModelCheckpoint``, numpy scalars...):
    the named class is never imported, constructed or called; the placeholder keeps what the pickle
    passed to it (``args``) and its BUILD state (``state``)."""

    qualified_name = ""

    def __init__(self, args: tuple[Any, ...] = ()) -> None:
        self.args = args
        self.state: Any = None

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualified_name}>"


@dataclass(frozen=True)
class Globals:
    """What GLOBAL / STACK_GLOBAL may name: ``objects`` by qualified name (callables are called by
    REDUCE with their arguments checked by themselves), and ``placeholders``, names that become fresh
    :class:`Placeholder` types. ``refuse(name)`` raises the caller's error for any other name."""

    objects: dict[str, Any]
    placeholders: frozenset[str]
    refuse: Callable[[str], Exception]


_KEY_TYPES = (str, bytes, float, bool, type(None))


class PickleMachine:
    """Runs one pickle: ``PickleMachine(data, globals_, persistent_load).run()``."""

    def __init__(
        self,
        data: bytes,
        globals_: Globals,
        persistent_load: Callable[[Any], Any],
        limits: Limits = Limits(),
    ) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.globals = globals_
        self.persistent_load = persistent_load
        self.limits = limits
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.fresh: set[int] = set()  # ids of the objects BUILD may touch: made by this run
        self.depths: dict[int, int] = {}  # container id -> nesting depth (leaves: 0)
        self.placeholder_types: dict[str, type[Placeholder]] = {}
        self.keep: list[Any] = []  # objects whose ids are in ``fresh``/``depths``: alive until the end

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> Any:
        data, size = self.data, len(self.data)
        while True:
            if self.pos >= size:
                raise PickleRejected("the pickle ends without STOP")
            code = data[self.pos]
            self.pos += 1
            op = _OPCODES.get(code)
            if op is None:
                raise PickleRejected(
                    f"pickle opcode {bytes([code])!r} at byte {self.pos - 1} is not one a checkpoint uses"
                )
            if op is _stop:
                if len(self.stack) != 1 or self.marks:
                    raise PickleRejected("the pickle stops with a malformed stack")
                return self.stack.pop()
            op(self)

    def _read(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise PickleRejected(f"the pickle ends in the middle of an opcode (byte {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _unpack(self, fmt: str) -> Any:
        layout = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        if self.pos + layout.size > len(self.data):
            raise PickleRejected(f"the pickle ends in the middle of an opcode (byte {self.pos})")
        value = layout.unpack_from(self.data, self.pos)[0]
        self.pos += layout.size
        return value

    def _line(self) -> str:
        end = bytes(self.data[self.pos : self.pos + 1024]).find(b"\n")
        if end < 0:
            raise PickleRejected("a GLOBAL name is not terminated within 1024 bytes")
        text = bytes(self._read(end + 1)[:-1])
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise PickleRejected("a GLOBAL name is not valid UTF-8") from None

    # --- the stack -------------------------------------------------------------------------------

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise PickleRejected("the pickle pops an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise PickleRejected("the pickle collects items without a MARK")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise PickleRejected("the pickle reads an empty stack")
        return self.stack[-1]

    # --- containers ------------------------------------------------------------------------------

    def made(self, value: Any, children: Any = ()) -> Any:
        """Register a container made by this run, with the depth its ``children`` give it."""
        depth = 1 + max((self.depths.get(id(c), 0) for c in children), default=0)
        self._set_depth(value, depth)
        self.fresh.add(id(value))
        self.keep.append(value)
        return value

    def _set_depth(self, value: Any, depth: int) -> None:
        if depth > self.limits.depth:
            raise PickleRejected(f"containers nest more than {self.limits.depth} deep")
        self.depths[id(value)] = max(depth, self.depths.get(id(value), 0))

    def add_children(self, container: Any, children: Any) -> None:
        depth = 1 + max((self.depths.get(id(c), 0) for c in children), default=0)
        self._set_depth(container, depth)

    def key(self, value: Any) -> Any:
        """A dictionary key or set member: only values whose hashing the file cannot steer."""
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= self.limits.key_integer:
                raise PickleRejected(f"a dictionary key is an integer of {value.bit_length()} bits")
            return value
        if isinstance(value, _KEY_TYPES) or (isinstance(value, type) and issubclass(value, Placeholder)):
            return value
        raise PickleRejected(f"a dictionary key is a {type(value).__name__}, not a string or number")

    def set_items(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict) or id(target) not in self.fresh:
            raise PickleRejected(f"SETITEMS on {describe(target)}, not a dictionary of this pickle")
        if len(items) % 2:
            raise PickleRejected("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            target[self.key(items[i])] = items[i + 1]
        self.add_children(target, items[1::2])

    def append_items(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, list) or id(target) not in self.fresh:
            raise PickleRejected(f"APPENDS on {describe(target)}, not a list of this pickle")
        target.extend(items)
        self.add_children(target, items)

    # --- globals, calls, state -------------------------------------------------------------------

    def find_global(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in self.globals.objects:
            return self.globals.objects[qualified]
        if qualified in self.globals.placeholders:
            if qualified not in self.placeholder_types:
                short = qualified.rsplit(".", 1)[-1]
                self.placeholder_types[qualified] = type(short, (Placeholder,), {"qualified_name": qualified})
            return self.placeholder_types[qualified]
        raise self.globals.refuse(qualified)

    def call(self, function: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise PickleRejected(f"REDUCE with arguments {describe(args)}, not a tuple")
        if isinstance(function, type) and issubclass(function, Placeholder):
            return self.made(function(args))
        if function is OrderedDict:
            if args:
                raise PickleRejected("OrderedDict is called with arguments; checkpoints build it empty")
            return self.made(OrderedDict())
        if not callable(function) or function not in self.globals.objects.values():
            raise PickleRejected(f"REDUCE calls {describe(function)}, which is not an allowed function")
        return function(*args)

    def build(self, target: Any, state: Any) -> None:
        if id(target) not in self.fresh:
            raise PickleRejected(f"the pickle changes the state of {describe(target)}, which it did not make")
        if isinstance(target, Placeholder):
            target.state = state
        elif not isinstance(target, OrderedDict):  # an OrderedDict's attributes (_metadata) are dropped
            raise PickleRejected(f"BUILD on {describe(target)}")


# --- the opcodes ---------------------------------------------------------------------------------


def _stop(m: PickleMachine) -> None:  # handled by the loop
    raise AssertionError


def _proto(m: PickleMachine) -> None:
    if m._read(1)[0] > 5:
        raise PickleRejected("pickle protocol above 5")


def _frame(m: PickleMachine) -> None:
    m._unpack("<Q")  # frames only group opcodes; the data is read as one stream


def _mark(m: PickleMachine) -> None:
    m.marks.append(len(m.stack))


def _pop(m: PickleMachine) -> None:
    m.pop()


def _pop_mark(m: PickleMachine) -> None:
    m.pop_mark()


def _number(m: PickleMachine, fmt: str) -> None:
    m.push(m._unpack(fmt))


def _long(m: PickleMachine, fmt: str) -> None:
    size = m._unpack(fmt)
    if size > m.limits.integer:
        raise PickleRejected(f"an integer of {size} bytes")
    m.push(int.from_bytes(m._read(size), "little", signed=True))


def _text(m: PickleMachine, fmt: str) -> None:
    size = m._unpack(fmt)
    if size > m.limits.string:
        raise PickleRejected(f"a string of {size} bytes")
    try:
        m.push(str(m._read(size), "utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        raise PickleRejected("a string that is not valid UTF-8") from None


def _bytes(m: PickleMachine, fmt: str) -> None:
    size = m._unpack(fmt)
    if size > m.limits.string:
        raise PickleRejected(f"bytes of {size}")
    m.push(bytes(m._read(size)))


def _put(m: PickleMachine, index: int) -> None:
    if index >= m.limits.memo or (index not in m.memo and len(m.memo) >= m.limits.memo):
        raise PickleRejected(f"memo index {index} beyond {m.limits.memo}")
    m.memo[index] = m.top()


def _get(m: PickleMachine, index: int) -> None:
    if index not in m.memo:
        raise PickleRejected(f"memo index {index} was never stored")
    m.push(m.memo[index])


def _tuple(m: PickleMachine, count: int | None) -> None:
    if count is None:
        items = m.pop_mark()
    else:
        items = [m.pop() for _ in range(count)][::-1]
    value = tuple(items)
    m.push(m.made(value, items) if items else value)


def _list(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.push(m.made(list(items), items))


def _dict(m: PickleMachine) -> None:
    items = m.pop_mark()
    value = m.made({})
    m.set_items(value, items)
    m.push(value)


def _set_add(m: PickleMachine) -> None:
    items = m.pop_mark()
    target = m.top()
    if not isinstance(target, set) or id(target) not in m.fresh:
        raise PickleRejected(f"ADDITEMS on {describe(target)}, not a set of this pickle")
    target.update(m.key(item) for item in items)


def _frozenset(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.push(frozenset(m.key(item) for item in items))


def _append(m: PickleMachine) -> None:
    item = m.pop()
    m.append_items(m.top(), [item])


def _appends(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.append_items(m.top(), items)


def _setitem(m: PickleMachine) -> None:
    value, key = m.pop(), m.pop()
    m.set_items(m.top(), [key, value])


def _setitems(m: PickleMachine) -> None:
    items = m.pop_mark()
    m.set_items(m.top(), items)


def _global(m: PickleMachine) -> None:
    module = m._line()
    name = m._line()
    m.push(m.find_global(module, name))


def _stack_global(m: PickleMachine) -> None:
    name, module = m.pop(), m.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise PickleRejected("STACK_GLOBAL with a name that is not a string")
    m.push(m.find_global(module, name))


def _reduce(m: PickleMachine) -> None:
    args = m.pop()
    function = m.pop()
    m.push(m.call(function, args))


def _newobj(m: PickleMachine) -> None:
    args, cls = m.pop(), m.pop()
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or not isinstance(args, tuple):
        raise PickleRejected(f"NEWOBJ of {describe(cls)}, which is not an allowed metadata class")
    m.push(m.made(cls(args)))


def _build(m: PickleMachine) -> None:
    state = m.pop()
    m.build(m.top(), state)


def _persid(m: PickleMachine) -> None:
    m.push(m.persistent_load(m.pop()))


def _empty(factory: Callable[[], Any]) -> Callable[[PickleMachine], None]:
    def op(m: PickleMachine) -> None:
        m.push(m.made(factory()))

    return op


def _const(value: Any) -> Callable[[PickleMachine], None]:
    def op(m: PickleMachine) -> None:
        m.push(value)

    return op


def _with(fn: Callable[..., None], *args: Any) -> Callable[[PickleMachine], None]:
    def op(m: PickleMachine) -> None:
        fn(m, *args)

    return op


def _reading(fn: Callable[[PickleMachine, int], None], fmt: str) -> Callable[[PickleMachine], None]:
    def op(m: PickleMachine) -> None:
        fn(m, m._unpack(fmt))

    return op


_OPCODES: dict[int, Callable[[PickleMachine], None]] = {
    ord(code): op
    for code, op in {
        ".": _stop,
        "\x80": _proto,
        "\x95": _frame,
        "(": _mark,
        "0": _pop,
        "1": _pop_mark,
        "N": _const(None),
        "\x88": _const(True),
        "\x89": _const(False),
        "J": _with(_number, "<i"),
        "K": _with(_number, "<B"),
        "M": _with(_number, "<H"),
        "\x8a": _with(_long, "<B"),
        "\x8b": _with(_long, "<i"),
        "G": _with(_number, ">d"),
        "X": _with(_text, "<I"),
        "\x8c": _with(_text, "<B"),
        "\x8d": _with(_text, "<Q"),
        "B": _with(_bytes, "<I"),
        "C": _with(_bytes, "<B"),
        "\x8e": _with(_bytes, "<Q"),
        ")": _const(()),
        "]": _empty(list),
        "}": _empty(dict),
        "\x8f": _empty(set),
        "\x90": _set_add,
        "\x91": _frozenset,
        "t": _with(_tuple, None),
        "\x85": _with(_tuple, 1),
        "\x86": _with(_tuple, 2),
        "\x87": _with(_tuple, 3),
        "l": _list,
        "d": _dict,
        "a": _append,
        "e": _appends,
        "s": _setitem,
        "u": _setitems,
        "q": _reading(_put, "<B"),
        "r": _reading(_put, "<I"),
        "\x94": lambda m: _put(m, len(m.memo)),
        "h": _reading(_get, "<B"),
        "j": _reading(_get, "<I"),
        "c": _global,
        "\x93": _stack_global,
        "R": _reduce,
        "\x81": _newobj,
        "b": _build,
        "Q": _persid,
    }.items()
}
