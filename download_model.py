#!/usr/bin/env python3
"""Downloads a GPT-2 checkpoint, e.g. `python3 download_model.py 117M` into checkpoints/117M/.

The work is done by gpt2jax.download; this is its command line. It needs only Python's standard library
(tqdm, if installed, draws the progress bars): the quickstart runs it before `pip install`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from gpt2jax.download import (
    HF_DEFAULT_ENDPOINT,
    HF_FILES,
    HF_OPTIONAL_FILES,
    HF_REPOS,
    OPENAI_DEFAULT_BASE_URL,
    OPENAI_FILES,
    OPENAI_FOLDERS,
    download,
)
from gpt2jax.fetch import DownloadError

_INDENT = " " * 18


def _by_value(names: dict[str, str]) -> str:
    """{"117M": "x", "124M": "x", ...} as lines "117M, 124M -> x"."""
    groups: dict[str, list[str]] = {}
    for name, value in names.items():
        groups.setdefault(value, []).append(name)
    return f"\n{_INDENT}".join(f"{', '.join(group)} -> {value}" for value, group in groups.items())


def _fill(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent=_INDENT, subsequent_indent=_INDENT).lstrip()


# Built from gpt2jax.download's tables, so that it says what the code does.
EPILOG = f"""where the files come from (a mirror must have the same layout):
  --source hf (default): {{HF_ENDPOINT}}/{{repo}}/resolve/{{revision}}/<file>
    HF_ENDPOINT   the hub or a mirror of it (default {HF_DEFAULT_ENDPOINT})
    repo          {_by_value(HF_REPOS)}
                  any other model name is itself the repo id (distilgpt2, user/my-gpt2)
    revision      --revision (default main)
    files         {_fill(", ".join(HF_FILES) + " (or model.safetensors.index.json and the shards it lists)")}
                  {_fill(", ".join(HF_OPTIONAL_FILES) + " where the repo has them")}
    HF_TOKEN      sent to HF_ENDPOINT's host only, for private or gated repos
  --source openai: {{GPT2_OPENAI_BASE_URL}}/models/{{size}}/<file>
    GPT2_OPENAI_BASE_URL
                  OpenAI's bucket or a mirror of it (default {OPENAI_DEFAULT_BASE_URL})
    size          {_by_value(OPENAI_FOLDERS)}
    files         {_fill(", ".join(OPENAI_FILES))}
the files land in {{--dir}}/{{model}}/ ("/" in a repo id becomes "--")"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download a GPT-2 checkpoint (resumable: run again after an interruption).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help=f"a GPT-2 size ({', '.join(HF_REPOS)}) or, for --source hf, a Hugging Face repo id "
        "(e.g. distilgpt2, user/my-gpt2)",
    )
    parser.add_argument(
        "--source",
        choices=("hf", "openai"),
        default="hf",
        help="hf: safetensors from the Hugging Face hub (default); openai: OpenAI's original TF files",
    )
    parser.add_argument("--dir", default="checkpoints", help="parent folder (default: checkpoints)")
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--retries", type=int, default=5, help="retries per file on network errors")
    parser.add_argument("--force", action="store_true", help="download again files already present")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        path = download(
            args.model,
            source=args.source,
            dest_root=args.dir,
            revision=args.revision,
            progress=not args.quiet,
            retries=args.retries,
            force=args.force,
        )
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the local side: disk full, no permission
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{args.model}: downloaded to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
