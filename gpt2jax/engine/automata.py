"""Which structured-output automata are resident in an engine's device tables, and where.

The worker inserts a constrained choice into a slot; `ResidentAutomata.place` gives the global state its
row starts in. An automaton already resident is reused (its states stay where they are); a new one is
appended, after the tables are rebuilt without the automata no slot uses any more when they are full, and
grown to the next capacity bucket (powers of two, from INITIAL_* up to MAX_*) when that is not enough. A
rebuild may move the automata that slots still use: `place` then returns each slot's state shift, which
the device applies to the decode state's `fsm` column. The tables' shapes change only when they grow, so a
new schema recompiles nothing until then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.constraint import Automaton
from gpt2jax.structured import Tables, offsets, stack

# Capacity buckets: the tables start at INITIAL_* (compiled at warm-up: 2 x 6.4 MB of bitmasks, allowed and
# closing, and 16.8 MB of transitions for GPT-2's vocabulary) and double, up to MAX_*, as automata need.
INITIAL_STATES = 1024
INITIAL_TRANSITIONS = 2 * 1024 * 1024
MAX_STATES = 16 * 1024
MAX_TRANSITIONS = 32 * 1024 * 1024


class TablesFull(ValueError):
    """The automata that slots use, plus the new one, exceed MAX_STATES or MAX_TRANSITIONS."""


class Placement(NamedTuple):
    initial: int  # the global state the slot's row starts in
    shift: np.ndarray | None  # [S] i32 added to every slot's fsm (a rebuild moved automata), else None


class ResidentAutomata:
    """The host's view of one engine's device tables: resident automata in table order, slot owners."""

    def __init__(self, n_vocab: int, slots: int) -> None:
        self.n_vocab, self.slots = n_vocab, slots
        self.resident: list[Automaton] = []
        self.owner: list[Automaton | None] = [None] * slots  # the automaton each slot last started in
        # Transitions grow with the vocabulary: a small one starts with fewer (64 a token, a power of two).
        self.states, self.transitions = (
            INITIAL_STATES,
            min(INITIAL_TRANSITIONS, 1 << (64 * n_vocab - 1).bit_length()),
        )
        self.version = 0  # bumped whenever `tables()` changes

    def tables(self) -> Tables:
        """Host (numpy) tables of the resident automata, padded to the current capacity."""
        return stack(self.resident, self.n_vocab, self.states, self.transitions)

    @property
    def capacity(self) -> tuple[int, int]:
        """(states, transitions) the tables are padded to: with the vocabulary, their shapes."""
        return self.states, self.transitions

    def empty(self, capacity: tuple[int, int] | None = None) -> Tables:
        """Tables of `capacity` (default the current one) holding nothing (for compiling)."""
        return stack([], self.n_vocab, *(capacity or self.capacity))

    def place(self, automaton: Automaton | None, slot: int) -> Placement:
        """Makes `automaton` resident for a choice inserted into `slot` (None: unconstrained)."""
        self.owner[slot] = automaton
        if automaton is None:
            return Placement(-1, None)
        if any(a is automaton for a in self.resident):
            return Placement(self._base(automaton) + automaton.initial, None)
        shift = None
        if not self._fits([*self.resident, automaton]):
            used = {id(a) for a in self.owner if a is not None}
            kept = [a for a in self.resident if id(a) in used and a is not automaton]
            shift = self._shift(kept)
            self.resident = kept
            while not self._fits([*self.resident, automaton]):
                self._grow([*self.resident, automaton], slot)
        self.resident.append(automaton)
        self.version += 1
        if shift is not None and not shift.any():
            shift = None
        return Placement(self._base(automaton) + automaton.initial, shift)

    def _base(self, automaton: Automaton) -> int:
        i = next(i for i, a in enumerate(self.resident) if a is automaton)
        return offsets(self.resident)[i]

    def _fits(self, automata: list[Automaton]) -> bool:
        return (
            sum(a.n_states for a in automata) <= self.states
            and sum(a.n_transitions for a in automata) <= self.transitions
        )

    def _grow(self, automata: list[Automaton], slot: int) -> None:
        before = self.states, self.transitions
        if sum(a.n_states for a in automata) > self.states:
            self.states = min(self.states * 2, MAX_STATES)
        if sum(a.n_transitions for a in automata) > self.transitions:
            self.transitions = min(self.transitions * 2, MAX_TRANSITIONS)
        if (self.states, self.transitions) == before:
            self.owner[slot] = None
            raise TablesFull(
                "the structured-output automata in use do not fit the device tables "
                f"({MAX_STATES} states, {MAX_TRANSITIONS} transitions); retry later"
            )

    def _shift(self, kept: list[Automaton]) -> np.ndarray:
        """Per slot, new base - old base of its automaton when only `kept` stay, in order (0 otherwise)."""
        old = dict(zip(map(id, self.resident), offsets(self.resident), strict=True))
        new = dict(zip(map(id, kept), offsets(kept), strict=True))
        return np.array(
            [new[id(a)] - old[id(a)] if a is not None and id(a) in new else 0 for a in self.owner], np.int32
        )


class DeviceAutomata:
    """ResidentAutomata plus their tables on the device (replicated), re-placed when they change, and
    the jitted shift of a decode state's `fsm` column after a rebuild moved automata."""

    def __init__(self, n_vocab: int, slots: int, put: Callable[[Any, Any], Any], replicated: Any,
                 by_slot: Any, state_sharding: Any) -> None:  # fmt: skip
        self.host = ResidentAutomata(n_vocab, slots)
        self._put, self._rep, self._by_slot = put, replicated, by_slot
        self._version, self._tables = -1, None
        shift = lambda state, d: state._replace(fsm=jnp.where(state.fsm >= 0, state.fsm + d, state.fsm))
        self._shift = jax.jit(shift, out_shardings=state_sharding, donate_argnums=0)

    def tables(self) -> Tables:
        """The device tables (placed again only after a change)."""
        if self._version != self.host.version:
            self._tables, self._version = self._put(self.host.tables(), self._rep), self.host.version
        return self._tables

    def place(self, state: Any, row: Any, slot: int) -> tuple[Any, Any]:
        """Makes the slot row's automaton resident for `slot`; returns the state (shifted if automata
        moved; donated) and the row (a SlotRow) with its first global state `fsm` set (-1: unconstrained)
        and the host-side automaton taken out."""
        placed = self.host.place(row.automaton, slot)
        if placed.shift is not None:
            state = self._shift(state, self._put(placed.shift, self._by_slot))
        return state, row._replace(fsm=np.int32(placed.initial), automaton=None)
