"""One request's sampling settings: a frozen record built once (from an HTTP body or a notebook call) and
passed whole, down to the device row that `gpt2jax.sampling.tensors_from` makes of it.

Adding a knob: a field here, a column in `sampling.SamplingTensors` (if the device uses it) and, for HTTP,
an entry in serving's SAMPLING_FIELDS of the same name. Nothing in between copies fields one by one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gpt2jax.constraint import Constraint

MAX_LOGPROBS = 20  # alternatives per token the device computes (sampling.NUM_TOP_LOGPROBS)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt's completions. Defaults are OpenAI's (temperature 1, no filtering).

    Names and meanings follow the OpenAI API and vLLM's SamplingParams. Raises ValueError naming the
    field for an out-of-range value. `logit_bias` may be given as a dict and `stop` as one string; they
    are stored as tuples (None as empty) so that the record stays hashable.
    """

    max_tokens: int = 16  # tokens to generate per choice; 0: only score the prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus filtering; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # keep tokens with probability >= min_p x the most likely one's; 0 = off
    presence_penalty: float = 0.0  # subtracted from every token generated so far (OpenAI's formula)
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None  # None: random; choice i samples from derive_seed(seed, i)
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    n: int = 1  # choices returned
    best_of: int | None = None  # generate this many, return the n with the highest mean token logprob
    logprobs: int | None = None  # None: no logprobs; else 0..MAX_LOGPROBS alternatives per token
    prompt_logprobs: bool = False  # also score the prompt tokens (echo with logprobs)
    ignore_eos: bool = False  # keep going after end-of-text (up to max_tokens)
    constraint: Constraint | None = None  # structured output: JSON schema, JSON object, regex or choice

    def __post_init__(self) -> None:
        bias = self.logit_bias or ()
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in pairs))
        stop = self.stop or ()
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))
        for name, lo, hi in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value}")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
                raise ValueError(f"{name} is {value}, but it must be {bounds}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a gpt2jax.constraint.Constraint, not {self.constraint!r}")
        if self.constraint is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be used with a structured-output constraint")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be greater than or equal to n ({self.n})")

    @property
    def candidates(self) -> int:
        """Completions generated: best_of if set, else n."""
        return self.best_of or self.n

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with these fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> SamplingParams:
        """The record of the entries of `values` named like a field (others ignored), e.g. parsed JSON."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# (field, lowest, highest) allowed; None: unbounded on that side.
_RANGES = (
    ("max_tokens", 0, None),
    ("temperature", 0.0, None),
    ("top_p", 0.0, 1.0),
    ("top_k", 0, 2**31 - 1),
    ("min_p", 0.0, 1.0),
    ("n", 1, None),
    ("best_of", 1, None),
    ("logprobs", 0, MAX_LOGPROBS),
)


def derive_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed of a request seeded with `seed`: distinct streams for n > 1, reproducible."""
    return (int(seed) * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + index) & 0xFFFFFFFFFFFFFFFF


def field_names() -> tuple[str, ...]:
    """Every SamplingParams field, in order."""
    return tuple(f.name for f in dataclasses.fields(SamplingParams))


def per_prompt(
    count: int, base: SamplingParams | Sequence[SamplingParams] | None = None, **settings: Any
) -> list[SamplingParams]:
    """One record per prompt: `base` (one record for all, or a list of one per prompt; default the
    defaults) with `settings` (SamplingParams fields) on top.

    A setting given as a list has one value per prompt; for `stop` and `logit_bias`, whose single value
    may itself be a list, a per-prompt value is a list of lists (or of dicts). Raises ValueError naming the
    setting when a list's length is not `count`, or when a value is out of range.
    """
    if base is None or isinstance(base, SamplingParams):
        rows = [base or SamplingParams()] * count
    else:
        rows = list(base)
        if len(rows) != count:
            raise ValueError(f"sampling_params has {len(rows)} records for {count} prompts")
    names = set(field_names())
    for name, value in settings.items():
        if name not in names:
            raise TypeError(
                f"unknown sampling setting {name!r} (SamplingParams has {', '.join(sorted(names))})"
            )
        if _is_per_prompt(name, value):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} values for {count} prompts")
            rows = [r.replace(**{name: v}) for r, v in zip(rows, value, strict=True)]
        else:
            rows = [r.replace(**{name: value}) for r in rows]
    return rows


def _is_per_prompt(name: str, value: Any) -> bool:
    if not isinstance(value, list | tuple):
        return False
    if name == "stop":
        return all(isinstance(v, list | tuple) or v is None for v in value) and bool(value)
    if name == "logit_bias":
        return all(isinstance(v, Mapping) or v is None for v in value) and bool(value)
    return True
