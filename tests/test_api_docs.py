"""README.md and docs/openapi.json keep up with the code."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from serving.chat.schema import CHAT_FIELDS
from serving.completions.schema import COMPLETION_FIELDS
from serving.openapi import build_spec
from serving.settings import Settings
from serving.tokenization.routes import DETOKENIZE_FIELDS, TOKENIZE_FIELDS

DOCS = Path(__file__).resolve().parents[1] / "docs"
SETTINGS_SOURCE = Path(__file__).resolve().parents[1] / "serving" / "settings.py"


def test_static_openapi_is_current():
    assert json.loads((DOCS / "openapi.json").read_text()) == json.loads(json.dumps(build_spec())), (
        "regenerate it: python -m serving.openapi docs/openapi.json"
    )


def test_readme_documents_every_variable_and_field():
    text = (DOCS.parent / "README.md").read_text()
    variables = set(re.findall(r'env, "([A-Z_]+)"|get\("([A-Z_]+)"\)', SETTINGS_SOURCE.read_text()))
    variables = {a or b for a, b in variables} | {"CORS_ORIGINS"}
    assert len(variables) >= len(dataclasses.fields(Settings)) - 1
    missing = sorted(v for v in variables if f"`{v}`" not in text)
    assert not missing, f"README.md lacks {missing}"
    for field in (*COMPLETION_FIELDS, *CHAT_FIELDS, *TOKENIZE_FIELDS, *DETOKENIZE_FIELDS):
        assert f"`{field.name}`" in text or f'"{field.name}"' in text, field.name
