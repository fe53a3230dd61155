"""The playground: a plain HTML/CSS/JS page at `/` that streams completions from the API (GitHub issue 8).

The page and its assets ship inside the package (serving/static/), so it works offline with no build step.
Neither route needs an API key: the page asks for one itself and sends it with its API calls.
"""

from __future__ import annotations

import pathlib

from quart import Quart, current_app

STATIC_DIR = pathlib.Path(__file__).with_name("static")


async def playground_page():
    return await current_app.send_static_file("playground.html")


def register_playground(app: Quart) -> None:
    """Adds `GET /` (the page) and makes the app's static route, `GET /static/<path>`, serve its assets.

    Every Quart app has that static route unless made with static_folder=None; the playground's files are
    the app's static files, so the app's static folder is pointed at them.
    """
    app.static_folder = str(STATIC_DIR)
    if "static" not in app.view_functions:
        app.add_url_rule("/static/<path:filename>", "static", app.send_static_file)
    app.add_url_rule("/", "playground", playground_page, methods=["GET"])
