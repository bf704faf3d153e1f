"""Starts the app: checks where it may listen, starts the job queue on the library, and serves the pages.

It listens on 127.0.0.1 unless told otherwise: the app trains, writes and deletes files on this machine and
has no login, so another address is a choice a person makes (and is warned about), and gradio's public share
link is made only with --share.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from limner.errors import LimnerError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "50mb"  # a reference image is a few MB; a larger upload is refused before it is stored


def host_warning(host: str) -> str | None:
    if host in LOOPBACK:
        return None
    return (
        f"warning: limner app listens on {host}: anyone who can reach this machine on that address can train, "
        "generate and delete concepts in the library (there is no login). Use --host 127.0.0.1 to keep it local."
    )


def serve(
    library: Path,
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    light_workers: int = 2,
) -> None:
    """Runs the app until interrupted."""
    # gradio reports usage to its makers unless told not to; this machine may have no network at all
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise LimnerError("limner app needs gradio: pip install 'limner[app]'") from e
    from limner.app.jobs import JobQueue
    from limner.app.ui import CSS, build

    if base is not None and not Path(base).exists():
        raise LimnerError(
            f"--base {base} does not exist; give a local SD folder or .safetensors file, or leave it out"
        )
    if (warning := host_warning(host)) is not None:
        print(warning, file=sys.stderr)
    library = Path(library).resolve()
    queue = JobQueue(library, base=base, light_workers=light_workers)
    interrupted = queue.recover()
    if interrupted:
        print(f"jobs interrupted by the last stop, offered for resume: {', '.join(map(str, interrupted))}")
    queue.start()
    demo = build(queue)
    # system fonts: the default theme fetches web fonts, which a machine without a network waits for
    theme = gr.themes.Default(
        primary_hue="orange",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )
    print(f"limner app: http://{'[' + host + ']' if ':' in host else host}:{port} (library {library})", flush=True)
    try:
        demo.queue(default_concurrency_limit=8).launch(
            server_name=host,
            server_port=port,
            share=share,
            allowed_paths=[str(library)],
            max_file_size=MAX_UPLOAD,
            ssr_mode=False,
            show_error=True,
            quiet=True,
            theme=theme,
            css=CSS,
        )
    finally:
        queue.stop()
