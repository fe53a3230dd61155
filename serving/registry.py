"""The served models: their names, OpenAI's old engine names as aliases, load status and engines."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from gpt2jax.download import HF_REPOS
from gpt2jax.engine.api import Engine
from serving.chat.template import ChatTemplate
from serving.errors import APIError

# OpenAI's engines of 2020, smallest to largest, and the names that grew out of them.
LEGACY_FAMILIES = ("ada", "babbage", "curie", "davinci")


def legacy_names(family: str) -> list[str]:
    names = [family, f"{family}-beta", f"{family}-instruct-beta", f"text-{family}-001"]
    if family in ("babbage", "davinci"):
        names.append(f"{family}-002")
    if family == "davinci":
        names += ["text-davinci-002", "text-davinci-003"]
    return names


LOADING, WARMING, READY, FAILED = "loading", "warming", "ready", "failed"

# The models committed under the repository's checkpoints/ (downloads land there too, under other names).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED_MODELS = ("pydoc-tiny",)
# OpenAI's GPT-2, by the names download_model.py gives its folders: sizes and hub ids, "/" as "--".
OPENAI_NAMES = {*HF_REPOS, *(r.replace("/", "--") for r in HF_REPOS.values())}
OPENAI_NAMES |= {r.split("/")[1] for r in HF_REPOS.values()}  # the hub's old ids: gpt2, gpt2-medium...


def owner_of(name: str, path: str | None = None) -> str:
    """Who made a served model (/v1/models' owned_by, /v1/engines' owner), from its folder name.

    "openai" for OpenAI's GPT-2 only; "gpt2jax" for the model shipped with this project; for a hub repo
    downloaded as `<owner>--<repo>`, its owner; else "user": a model of whoever runs the server.
    """
    if path is not None and Path(path).resolve() in {(SHIPPED_DIR / n).resolve() for n in SHIPPED_MODELS}:
        return "gpt2jax"
    if name in OPENAI_NAMES:
        return "openai"
    owner, sep, _ = name.partition("--")
    return owner if sep and owner else "user"


@dataclasses.dataclass
class ServedModel:
    name: str
    n_params: int = 0  # for ordering legacy aliases by size; 0 if unknown
    path: str | None = None  # checkpoint folder, if loaded from disk
    status: str = LOADING
    engine: Engine | None = None
    chat_template: ChatTemplate = dataclasses.field(default_factory=ChatTemplate)
    error: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def n_ctx(self) -> int | None:
        return self.engine.n_ctx if self.engine is not None else None

    @property
    def owner(self) -> str:
        return owner_of(self.name, self.path)


def default_aliases(models: Sequence[ServedModel]) -> dict[str, str]:
    """ada -> the smallest model ... davinci -> the largest, spreading the four over the sizes served."""
    by_size = sorted(models, key=lambda m: m.n_params)  # stable: equal sizes keep the served order
    if not by_size:
        return {}
    out = {}
    for rank, family in enumerate(LEGACY_FAMILIES):
        target = by_size[round(rank * (len(by_size) - 1) / (len(LEGACY_FAMILIES) - 1))].name
        out.update(dict.fromkeys(legacy_names(family), target))
    return out


class ModelRegistry:
    """Served models by name, with aliases; the routes look models up here."""

    def __init__(self, models: Iterable[ServedModel], aliases: Iterable[tuple[str, str]] = ()) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.explicit_aliases = tuple(aliases)
        for alias, target in self.explicit_aliases:
            if target not in self.models:
                raise ValueError(f"MODEL_ALIASES: {alias}={target}, but {target!r} is not a served model")
        self._set_aliases()

    def _set_aliases(self) -> None:
        """The legacy names spread over the models that have not failed, then MODEL_ALIASES over them."""
        self.aliases = {a: t for a, t in default_aliases(self.served()).items() if a not in self.models}
        self.aliases.update(self.explicit_aliases)

    def served(self) -> list[ServedModel]:
        """The models that are served or being loaded: all but those that failed to load."""
        return [m for m in self.models.values() if m.status != FAILED]

    def mark_failed(self, name: str, error: str) -> None:
        """A model that could not be loaded: left out of the lists and of the legacy names."""
        model = self.models[name]
        model.status, model.error, model.engine = FAILED, error, None
        self._set_aliases()

    @classmethod
    def from_engines(
        cls, engines: Mapping[str, Engine], aliases: Iterable[tuple[str, str]] = ()
    ) -> ModelRegistry:
        """A registry of engines that are already started and warm."""
        models = [ServedModel(name, engine=e, status=READY) for name, e in engines.items()]
        return cls(models, aliases)

    def resolve(self, name: str, param: str | None = "model") -> ServedModel:
        """The served model for a name or alias; 404 naming the served ids otherwise."""
        model = self.models.get(name) or self.models.get(self.aliases.get(name, ""))
        if model is None or model.status == FAILED:
            served = ", ".join(m.name for m in self.served()) or "(none)"
            why = "failed to load" if model is not None else "does not exist"
            raise APIError(
                404,
                f"The model '{name}' {why}. Served models: {served}.",
                param=param,
                code="model_not_found",
            )
        return model

    def engine(self, name: str, param: str | None = "model") -> tuple[ServedModel, Engine]:
        """The model and its engine, or 503 while it is still loading."""
        model = self.resolve(name, param)
        if model.status != READY or model.engine is None:
            raise APIError(
                503,
                f"The model '{model.name}' is not ready ({model.status}); retry later.",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        return model, model.engine

    def first(self) -> ServedModel:
        served = self.served()
        if not served:
            raise APIError(404, "No model is served.", code="model_not_found")
        return served[0]

    @property
    def all_ready(self) -> bool:
        return bool(self.models) and all(m.status == READY for m in self.models.values())

    @property
    def all_settled(self) -> bool:
        """Every model is either ready or failed (none is still loading)."""
        return all(m.status in (READY, FAILED) for m in self.models.values())

    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for m in self.models.values():
            out[m.name] = {"status": m.status} | ({"error": m.error} if m.error else {})
        return out
