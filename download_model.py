#!/usr/bin/env python3
"""Downloads a GPT-2 checkpoint, e.g. `python3 download_model.py 117M` into checkpoints/117M/.

The work is done by gpt2jax.download; this is its command line.
"""

from __future__ import annotations

import argparse
import sys

from gpt2jax.download import HF_REPOS, DownloadError, download


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download a GPT-2 checkpoint (resumable: run again after an interruption).",
        epilog="Environment: HF_ENDPOINT, HF_TOKEN (private or gated repos), GPT2_OPENAI_BASE_URL.",
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
