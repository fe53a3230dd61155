"""Structured outputs below HTTP: constraints (gpt2jax/constraint.py), the device lookups
(gpt2jax/structured.py), the resident tables (gpt2jax/engine/automata.py) and the notebook API.

The automata are outlines-core's over the tiny tokenizer (`tok`) or GPT-2's own vocabulary; the device
lookups are checked against outlines-core's own Index, entry by entry.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import sampling, structured
from gpt2jax.constraint import Automaton, Constraint, bounded_integers, compile_automaton
from gpt2jax.engine.automata import ResidentAutomata, TablesFull

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "kind": {"enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
UNBOUNDED_INT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
FREE = 1 << 20  # a budget that never closes


def test_unsupported_schema_features_are_named():
    schema = {"type": "object", "properties": {"a": {"type": "number", "minimum": 1}, "b": {"not": {}}}}
    with pytest.raises(ValueError, match=r"properties\.a\.minimum.*properties\.b\.not"):
        Constraint.json_schema(schema)
    with pytest.raises(ValueError, match="format='hostname'"):
        Constraint.json_schema({"type": "string", "format": "hostname"})


def test_integers_bounded_on_both_sides_become_enums():
    s = bounded_integers({"type": "integer", "exclusiveMinimum": 0, "maximum": 3, "title": "n"})
    assert s == {"title": "n", "enum": [1, 2, 3]}
    assert bounded_integers({"type": "integer", "minimum": 0}) == {"type": "integer", "minimum": 0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"regex": ""}, "non-empty"),
        ({"choice": []}, "non-empty"),
        ({"response_format": {"type": "xml"}}, "response_format type"),
        ({"regex": "a", "choice": ["b"]}, "only one"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": {"type": "string", "maxLength": 24}}, "maxLength=24"),  # would take minutes to build
        ({"regex": "[a-z]{40}"}, "at most 32"),
    ],
)
def test_malformed_constraints_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Constraint.of(**kwargs)


def test_text_response_format_is_no_constraint():
    assert Constraint.of(response_format={"type": "text"}) is None


def test_bad_regex_fails_at_compile(tok):
    with pytest.raises(ValueError, match="cannot compile"):
        compile_automaton(Constraint("regex", "[a-"), tok, 512)


def test_automata_are_cached_and_match_outlines(tok):
    from outlines_core import Index

    from gpt2jax.constraint import _vocabulary

    c = Constraint("regex", r"[0-9]{3}-[a-z]{2}")
    a = compile_automaton(c, tok, 512)
    assert compile_automaton(c, tok, 512) is a
    index = Index(c.regex(), _vocabulary(tok))
    ids = {s: i for i, s in enumerate(sorted(index.get_transitions()))}
    tables = structured.stack([a], 512, 16, 4096)
    for s, moves in index.get_transitions().items():
        fsm = jnp.full((len(moves),), ids[s], jnp.int32)
        allowed = np.asarray(structured.allowed_tokens(tables, fsm[:1], jnp.array([FREE]), 512))[0]
        assert sorted(np.flatnonzero(allowed)) == sorted(moves)
        toks = jnp.array(list(moves), jnp.int32)
        got = np.asarray(structured.next_state(tables, fsm, toks))
        assert got.tolist() == [ids[d] for d in moves.values()]
    assert a.initial == ids[index.get_initial_state()]


def test_device_tables_bytes_for_the_test_schemas(rand_small):
    """The bytes this module's schemas take on the device with GPT-2's 50,257 tokens (README figures)."""
    from gpt2jax.tokenizer import GPT2Tokenizer

    gpt2 = GPT2Tokenizer.from_dir(rand_small)
    sizes = {}
    for name, c in {
        "pet": Constraint.json_schema(PET),
        "json_object": Constraint("json_object"),
        "regex": Constraint("regex", r"[0-9]{3}-[a-z]{2}"),
        "choice": Constraint.of(choice=["yes", "no", "maybe"]),
    }.items():
        a = compile_automaton(c, gpt2, 50257)
        sizes[name] = (a.n_states, a.n_transitions, a.nbytes)
        assert a.allowed.shape == (a.n_states, 1571)  # ceil(50257 / 32) words a state, not 50257 int32s
    print("device tables (states, transitions, bytes):", sizes)
    assert all(b < 16 * 2**20 for _, _, b in sizes.values())


def test_constrain_leaves_unconstrained_rows_bit_identical(tok):
    a = compile_automaton(Constraint.of(choice=["yes", "no"]), tok, 512)
    tables = structured.stack([a], 512, 8, 64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 512)), jnp.float32)
    fsm = jnp.array([-1, a.initial, -1], jnp.int32)
    budget = jnp.full((3,), FREE, jnp.int32)
    out = np.asarray(structured.constrain(x, tables, fsm, budget))
    np.testing.assert_array_equal(out[[0, 2]], np.asarray(x)[[0, 2]])
    allowed = set(np.flatnonzero(np.isfinite(out[1])))
    assert allowed == set(a.token[a.start[a.initial] : a.start[a.initial + 1]].tolist())
    # Sampling with the mask: the constrained row samples an allowed token, the others as without it.
    sp = sampling.make_params(3, 512, temperature=1.0, seed=[1, 2, 3])
    counts, step = jnp.zeros((3, 512), jnp.int32), jnp.zeros((3,), jnp.int32)
    plain = sampling.sample(x, counts, step, sp, jnp.bool_(False))
    masked = sampling.sample(
        x, counts, step, sp, jnp.bool_(False), lambda y: structured.constrain(y, tables, fsm, budget)
    )
    assert int(masked.token[1]) in allowed
    np.testing.assert_array_equal(np.asarray(masked.token)[[0, 2]], np.asarray(plain.token)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(masked.logprob)[[0, 2]], np.asarray(plain.logprob)[[0, 2]])


def _fake(states: int, transitions: int) -> Automaton:
    """An automaton of these sizes (contents irrelevant to placement)."""
    start = np.linspace(0, transitions, states + 1).astype(np.int32)
    zeros, bits = np.zeros(transitions, np.int32), np.zeros((states, 16), np.uint32)
    return Automaton(
        1, bits, start, zeros, zeros, np.zeros(states, np.int32), np.zeros(states, np.int32), bits, 0.0
    )


def test_resident_automata_reuse_compact_and_grow(monkeypatch):
    import gpt2jax.engine.automata as automata

    for name, value in [("INITIAL_STATES", 16), ("INITIAL_TRANSITIONS", 256), ("MAX_STATES", 32),
                        ("MAX_TRANSITIONS", 512)]:  # fmt: skip
        monkeypatch.setattr(automata, name, value)
    a, b, c = _fake(10, 100), _fake(10, 100), _fake(15, 100)
    r = ResidentAutomata(512, slots=2)
    assert r.place(a, 0) == (1, None)
    assert r.place(a, 1) == (1, None)  # already resident: reused
    assert r.place(b, 1) == (11, None) and r.states == 32  # grown to the next bucket, nothing moved
    r.place(None, 0)  # slot 0 is unconstrained now: a is no longer used
    placed = r.place(c, 0)  # 35 states do not fit 32: a is dropped, b moves to 0
    assert placed.initial == 10 + 1 and placed.shift.tolist() == [0, -10]
    assert r.resident == [b, c]
    with pytest.raises(TablesFull):
        r.place(_fake(40, 10), 0)
    host = r.tables()
    assert host.allowed.shape == (32, 16) and host.token.shape == (256,)


def test_notebook_generate_is_constrained(tiny_model):
    texts = tiny_model.generate(
        "The", max_tokens=12, temperature=1.0, n=4, seed=5, regex=r"[0-9]{3}-[a-z]{2}"
    )
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) for t in texts), texts
    texts = tiny_model.generate(["a", "b"], max_tokens=8, seed=1, choice=["yes", "no", "maybe"])
    assert set(texts) <= {"yes", "no", "maybe"}
    out = tiny_model.complete("x", max_tokens=60, seed=2, n=2, json_schema=PET)
    for c in out:
        assert c.finish_reason == "stop"
        pet = json.loads(c.text)
        assert len(pet["name"]) <= 12 and 0 <= pet["age"] <= 30 and pet["kind"] in ("cat", "dog", "bird")
    cut = tiny_model.complete("x", max_tokens=3, seed=2, json_schema=PET)[0]
    assert cut.finish_reason == "length"
    # Unconstrained generation is unchanged by the constrained ones beside it.
    alone = tiny_model.generate("The", max_tokens=8, temperature=0)
    both = tiny_model.generate(["The", "The"], max_tokens=8, temperature=0, regex=None)
    assert both == alone * 2


def _bits(words: np.ndarray) -> set[int]:
    """The token ids set in one state's bitmask row [W] u32."""
    return {int(t) for t in np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))}


def test_closing_tables_match_a_brute_force_search(tok):
    """dist, maxd and the closing bitmask against their definitions over outlines-core's own transitions;
    then the mask the device applies at every budget: closing tokens once maxd[s] >= budget - 1."""
    from outlines_core import Index

    from gpt2jax.constraint import _vocabulary

    c = Constraint("regex", r"(ab|[0-9]{2}-[0-9]c)(x|-yz)?")
    a = compile_automaton(c, tok, 512)
    index = Index(c.regex(), _vocabulary(tok))
    moves = index.get_transitions()
    ids = {s: i for i, s in enumerate(sorted(moves))}
    dist = {s: 0 if index.is_final_state(s) else 10**9 for s in moves}
    while True:  # Bellman-Ford: relax every transition until nothing changes
        relaxed = {s: min([dist[s]] + [dist[d] + 1 for d in moves[s].values()]) for s in moves}
        if relaxed == dist:
            break
        dist = relaxed
    assert max(dist.values()) >= 3  # the regex has depth enough to test
    tables = structured.stack([a], 512, 16, 4096)
    for s, m in moves.items():
        i = ids[s]
        assert a.dist[i] == dist[s] and a.maxd[i] == max(dist[d] for d in m.values())
        near = {t for t, d in m.items() if dist[d] < dist[s] or t == tok.eos_token_id}
        assert _bits(a.closing[i]) == near and near <= set(m)
        for budget in range(1, int(a.maxd[i]) + 4):
            got = structured.allowed_tokens(tables, jnp.array([i]), jnp.array([budget]), 512)
            want = near if a.maxd[i] >= budget - 1 else set(m)
            assert set(np.flatnonzero(np.asarray(got)[0]).tolist()) == want, (s, budget)
    assert a.min_tokens == dist[index.get_initial_state()] + 1


@pytest.mark.parametrize("constraint", [Constraint("json_object"), Constraint.json_schema(UNBOUNDED_INT)],
                         ids=["json_object", "unbounded_int"])  # fmt: skip
def test_uniform_random_walks_finish_within_any_budget(tok, constraint):
    """Tokens drawn uniformly from the device mask (the worst a model can do: long keys, strings and
    numbers), at every budget from the automaton's min_tokens: each walk ends with end-of-text in an
    accepting state before the budget runs out, and the text parses."""
    a = compile_automaton(constraint, tok, 512)
    tables = structured.stack([a], 512, 256, 1 << 16)
    allowed = jax.jit(structured.allowed_tokens, static_argnums=3)
    rng = np.random.default_rng(0)
    for budget in (a.min_tokens, a.min_tokens + 1, 24, 200):
        for _ in range(20):
            state, out = a.initial, []
            for used in range(budget):
                mask = allowed(tables, jnp.array([state]), jnp.array([budget - used]), 512)
                t = int(rng.choice(np.flatnonzero(np.asarray(mask)[0])))
                if t == tok.eos_token_id:
                    break
                out.append(t)
                state = int(
                    a.next[a.start[state] + np.searchsorted(a.token[a.start[state] : a.start[state + 1]], t)]
                )
            assert t == tok.eos_token_id, (budget, tok.decode(out))
            assert isinstance(json.loads(tok.decode(out)), dict)


def test_notebook_json_mode_always_closes_in_budget(tiny_model):
    """JSON mode at temperature 1 over 20 seeds with small budgets: every choice stops (end-of-text)
    with a JSON object, however long the random model's keys and strings would run."""
    for max_tokens in (8, 24):
        out = tiny_model.complete(["{"] * 5, max_tokens, n=4, temperature=1.0, seed=[1, 2, 3, 4, 5],
                                  response_format={"type": "json_object"})  # fmt: skip
        assert len(out) == 20
        for c in out:
            assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict), c.text


def test_a_new_schema_compiles_nothing_after_warmup(tiny_model, compiles):
    """The tables are arguments of the compiled programs, sized at warm-up: new constraints only change
    their contents (a request that starts a constrained row compiles no program)."""
    from gpt2jax.engine.api import GenerationRequest
    from gpt2jax.engine.engine import BatchEngine
    from gpt2jax.engine.offline import run_all

    engine = BatchEngine.from_model(tiny_model, slots=2)
    engine.warmup(buckets=(16,), score_prompt=False)
    prompt = tuple(tiny_model.tokenizer.encode("The"))
    try:
        run_all(engine, [GenerationRequest.of(prompt, max_tokens=3, seed=1)])  # anything run-time lazy
        before = len(compiles)
        constraints = [
            Constraint("regex", "[a-c]{2}x"),
            Constraint.of(choice=["up", "down"]),
            Constraint("json_object"),
        ]
        requests = [
            GenerationRequest.of(prompt, max_tokens=20, seed=i, constraint=c)
            for i, c in enumerate(constraints)
        ]
        out = run_all(engine, requests)
        assert re.fullmatch("[a-c]{2}x", out[0][0].text) and out[1][0].text in ("up", "down")
        assert len(compiles) == before
    finally:
        engine.stop()


def test_tables_that_grow_recompile_sampling_and_decode_for_their_new_shape(
    tiny_model, compiles, monkeypatch
):
    """An automaton that does not fit the tables grows them: first-token sampling and decode (the
    programs that take the tables) compile again for the new shapes, and the outputs obey the
    constraints; an unconstrained request after it gets the text it got before."""
    import gpt2jax.engine.automata as automata
    from gpt2jax.engine.api import GenerationRequest
    from gpt2jax.engine.engine import BatchEngine
    from gpt2jax.engine.offline import run_all

    monkeypatch.setattr(automata, "INITIAL_STATES", 4)
    engine = BatchEngine.from_model(tiny_model, slots=2)
    engine.warmup(buckets=(16,), score_prompt=False)
    prompt = tuple(tiny_model.tokenizer.encode("The"))
    plain = GenerationRequest.of(prompt, max_tokens=6, temperature=0.0)
    try:
        before_text = run_all(engine, [plain])[0][0].text
        capacity, before = engine.programs.automata.host.capacity, len(compiles)
        regex = GenerationRequest.of(
            prompt, max_tokens=20, seed=1, constraint=Constraint("regex", "[a-c]{9}x")
        )
        out = run_all(engine, [regex])
        assert re.fullmatch("[a-c]{9}x", out[0][0].text), out[0][0].text
        assert engine.programs.automata.host.capacity[0] > capacity[0]  # 11 states do not fit 4
        assert len(compiles) - before >= 2  # first-token sampling and a decode, for the new tables
        assert run_all(engine, [plain])[0][0].text == before_text
    finally:
        engine.stop()


def test_unconstrained_request_is_bit_identical_beside_constrained_ones(tiny_model):
    """With batch invariance, a request's tokens and logprobs are the same alone and beside a constrained
    one: the mask and the automaton lookups touch only the constrained rows. (Rebuilds the model's engine:
    keep this test last.)"""
    from gpt2jax.sampling_params import SamplingParams

    tiny_model.start_engine(batch_invariant=True, slots=4)
    plain = SamplingParams(max_tokens=10, temperature=1.0, seed=4, logprobs=2)
    alone = tiny_model.complete("The", sampling_params=plain)[0]
    constrained = plain.replace(seed=5, constraint=Constraint("regex", r"[0-9]{3}-[a-z]{2}"))
    both = tiny_model.complete(["The", "x"], sampling_params=[plain, constrained])
    assert both[0].token_ids == alone.token_ids and both[0].logprobs == alone.logprobs
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", both[1].text)
