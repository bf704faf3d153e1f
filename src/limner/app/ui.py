"""The app's pages (gradio Blocks). Each page turns its form into a job's parameters, submits it to the queue
and shows the latest job of its kind as the store has it; a one-second timer refreshes what changed. The
forms come from the method registry and each method's settings dataclass, so a method added later appears
here with no change to this module.
"""

from __future__ import annotations

import html
import json
import shlex
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import gradio as gr

from limner.app import library as lib
from limner.app.db import FINISHED, RUNNING, Job
from limner.app.jobs import RESUMABLE, JobQueue
from limner.app.tasks import COMPARE, EVAL, GENERATE, TRAIN
from limner.errors import LimnerError
from limner.methods.settings import parse_setting

# settings the page sets through fields of its own (steps) or by its buttons (resume)
OWN_TRAINER_FIELDS = ("max_steps", "resume")
CSS = """
.limner-bar{background:#e5e7eb;border-radius:6px;height:18px;overflow:hidden}
.limner-bar>div{background:#f97316;height:100%;transition:width .5s}
.pixelated img{image-rendering:pixelated}
"""


# ---------------------------------------------------------------------------------------------------------------
# what the pages show, computed from the store and the library (plain functions: the tests call them too)
# ---------------------------------------------------------------------------------------------------------------


def jobs_rows(queue: JobQueue) -> list[list[Any]]:
    rows = []
    for j in queue.store.list()[:50]:
        p = j.progress
        progress = f"{p['step']}/{p['total']}" if p.get("total") else ""
        when = time.strftime("%H:%M:%S", time.localtime(j.created))
        rows.append([j.id, j.kind, j.state, j.name, progress, when, j.error or ""])
    return rows


def progress_html(job: Job | None) -> str:
    """A training's state: a bar with step, loss and time left while it runs, its outcome once finished."""
    if job is None:
        return "<p>No training yet: pick a subject and a method, then Start.</p>"
    p = job.progress
    step, total = p.get("step", 0), p.get("total") or job.params.get("steps") or 0
    share = 100 * step / total if total else 0
    parts = [f"<b>job {job.id}</b> &middot; {html.escape(job.name)} &middot; <b class='limner-state'>{job.state}</b>"]
    if p.get("stage"):
        parts.append(html.escape(p["stage"]))
    if total:
        parts.append(f"step <span class='limner-step'>{step}</span>/{total}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if job.state == RUNNING and p.get("left_s") is not None:
        parts.append(f"{p['left_s']:.0f} s left")
    if job.state in RESUMABLE and job.kind == TRAIN:
        parts.append("resume it below to continue from its last checkpoint")
    bar = f"<div class='limner-bar'><div style='width:{share:.0f}%'></div></div>"
    error = f"<p style='color:#b91c1c'>{html.escape(job.error)}</p>" if job.error else ""
    return f"<div id='limner-progress'>{' &middot; '.join(parts)}{bar}{error}</div>"


def latest(queue: JobQueue, kind: str) -> Job | None:
    found = queue.store.list(kinds=(kind,))
    return found[0] if found else None


def concept_choices(library: Path) -> list[tuple[str, str]]:
    return [(e.label, str(e.path)) for e in lib.entries(library) if e.kind == lib.CONCEPTS]


def tokens_note(paths: list[str] | None) -> str:
    lines = []
    for p in paths or []:
        try:
            m = json.loads((Path(p) / lib.MANIFESTS[lib.CONCEPTS]).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        words = m.get("token") or ", ".join(m.get("tokens", [])[:1])
        lines.append(f"- **{Path(p).name}** ({m.get('method')}): `{words} {m.get('class_noun', '')}`")
    return "Tokens for the prompt:\n" + "\n".join(lines) if lines else ""


def prompt_with_tokens(prompt: str, paths: list[str] | None) -> str:
    """The prompt with each selected concept's words added where it names none of them yet."""
    for p in paths or []:
        m = json.loads((Path(p) / lib.MANIFESTS[lib.CONCEPTS]).read_text())
        token = m.get("token") or (m.get("tokens") or [""])[0]
        if token and token not in prompt:
            prompt = f"{prompt.strip()} a {token} {m.get('class_noun', '')}".strip()
    return prompt


def generate_command(params: dict[str, Any]) -> str:
    """The `limner generate` line that draws the same images again (the record says the rest)."""
    args = ["limner", "generate", params["prompt"], "-n", str(params["num_images"]), "--seed", str(params["seed"])]
    args += ["--steps", str(params["steps"]), "--guidance", str(params["guidance"])]
    args += ["--scheduler", params["scheduler"]]
    if params.get("negative"):
        args += ["--negative", params["negative"]]
    for key in ("height", "width", "layout_steps"):
        if params.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(params[key])]
    if params.get("regions"):
        args.append("--regions")
    for c in params.get("concepts", []):
        args += ["--concept", c]
    if params.get("images"):
        args += ["--method", params["method"]]
        for image in params["images"]:
            args += ["--image", image]
        for item in params.get("settings", []):
            args += ["--set", item]
    return shlex.join(args)


def encoder_methods() -> list[str]:
    """The methods that encode reference images at generation time (IP-Adapter, ...), from the registry."""
    from limner.methods import get_method, method_names
    from limner.methods.adapter import AdapterMethod

    return [n for n in method_names() if isinstance(get_method(n), AdapterMethod)]


def optional_int(value: Any) -> int | None:
    """A form's number where empty or 0 means 'the default'."""
    if value in (None, ""):
        return None
    return int(value) or None


def method_settings(name: str) -> tuple[list[tuple[str, Any, str]], dict[str, Any]]:
    """(method settings as (key, default, help), trainer settings' defaults for this method) from the registry."""
    from limner.methods import get_method
    from limner.methods.settings import describe

    m = get_method(name)
    own = [row for row in describe(m.config_cls) if row[0] != "train"] if m.config_cls else []
    train = m.default_train_config()
    trainer = {f.name: getattr(train, f.name) for f in fields(train)} if train is not None else {}
    return own, {k: v for k, v in trainer.items() if k not in OWN_TRAINER_FIELDS}


def changed_settings(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, str]:
    """The settings a person changed, as `--set` values (the command parses them as it parses typed ones)."""
    out = {}
    for key, value in values.items():
        default = defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            if bool(value) != bool(default):
                out[key] = "true" if value else "false"
        elif str(value).strip() != ("" if default is None else str(default)):
            out[key] = str(value).strip()
    return out


def world_subjects() -> list[str]:
    from limner.world.heldout import IDENTITIES, SUBJECTS

    return [s.name for s in SUBJECTS] + [b.name for b in IDENTITIES]


def file_url(path: str | Path) -> str:
    """A library file as the server serves it (the library is an allowed path)."""
    return f"/gradio_api/file={Path(path).resolve()}"


# ---------------------------------------------------------------------------------------------------------------
# the pages
# ---------------------------------------------------------------------------------------------------------------


def build(queue: JobQueue) -> gr.Blocks:
    from limner.demo import DEFAULT_METHOD
    from limner.generation import SCHEDULERS
    from limner.methods import get_method, method_names

    library = queue.library
    with gr.Blocks(title="limner", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## limner &nbsp;<small>base: {queue.base or 'the world base (shipped)'} &middot; library: "
            f"`{library.resolve()}`</small>"
        )
        timer = gr.Timer(1.0)
        seen = gr.State({})  # per page: what each refreshing output last showed, so unchanged ones are skipped

        def fresh(state: dict, key: str, value: Any, signature: Any = None) -> Any:
            """`value` if it differs from what this page shows, else gradio's skip (no redraw, no lost scroll)."""
            sig = json.dumps(signature if signature is not None else value, default=str)
            if state.get(key) == sig:
                return gr.skip()
            state[key] = sig
            return value

        with gr.Tabs():
            # ---------------------------------------------------------------------------- Personalize
            with gr.Tab("Personalize", id="personalize"):
                with gr.Row():
                    with gr.Column():
                        source = gr.Radio(
                            ["upload", "world-bench subject"],
                            value="upload",
                            label="reference images from",
                            # its event is made by the settings form below, after the page loads: so say it
                            interactive=True,
                        )
                        refs = gr.File(
                            label="reference images",
                            file_count="multiple",
                            file_types=["image"],
                            elem_id="refs",
                            interactive=True,
                        )
                        subject = gr.Dropdown(
                            world_subjects(), value="duo_ball", label="world-bench subject", interactive=True
                        )
                        class_noun = gr.Textbox(
                            label="class noun", placeholder="dog (world subjects know their own)", interactive=True
                        )
                        captions = gr.Textbox(
                            label="captions (optional): one line per image, in upload order", lines=2, interactive=True
                        )
                        masks = gr.File(
                            label="masks (optional): white where the subject is, one per image, same order",
                            file_count="multiple",
                            file_types=["image"],
                            interactive=True,
                        )
                    with gr.Column():
                        name = gr.Textbox(
                            label="concept name",
                            placeholder="default: subject-method",
                            elem_id="name",
                            interactive=True,
                        )
                        names = method_names()
                        method = gr.Dropdown(
                            [(f"{n} ({get_method(n).family})", n) for n in names],
                            # the demo's choice: the app names no method itself, so new ones need no change here
                            value=DEFAULT_METHOD if DEFAULT_METHOD in names else names[0],
                            label="method",
                            elem_id="method",
                        )
                        steps = gr.Number(
                            label="steps (0: the method's default)",
                            precision=0,
                            elem_id="steps",
                            value=None,
                            interactive=True,
                        )
                        start_note = gr.Markdown(elem_id="start-note")

                        @gr.render(inputs=[method])
                        def settings_form(method_name: str):
                            m = get_method(method_name)
                            can = ", ".join(k for k, v in vars(m.capabilities).items() if v) or "none"
                            gr.Markdown(f"**{method_name}**: {m.family} method; capabilities: {can}")
                            own, trainer = method_settings(method_name)
                            boxes: dict[str, gr.components.Component] = {}
                            defaults: dict[str, Any] = {}
                            with gr.Accordion("method settings", open=False):
                                for key, default, help_text in own:
                                    boxes[key], defaults[key] = setting_box(key, default, help_text), default
                            if trainer:
                                with gr.Accordion("trainer settings", open=False):
                                    for key, default in trainer.items():
                                        boxes[key], defaults[key] = setting_box(key, default, "trainer"), default
                            start = gr.Button("Start", variant="primary", elem_id="start")
                            keys = list(boxes)

                            def submit(src, files, subj, noun, caps, mask_files, concept_name, n, *values):
                                try:
                                    params = personalize_params(
                                        queue, method_name, src, files, subj, noun, caps, mask_files, concept_name, n
                                    )
                                    params["settings"] = changed_settings(defaults, dict(zip(keys, values)))
                                except LimnerError as e:
                                    return f"**error:** {e}"
                                job_id = queue.submit(TRAIN, params)
                                return f"job {job_id} queued: training `{params['name']}`"

                            start.click(
                                submit,
                                inputs=[
                                    source,
                                    refs,
                                    subject,
                                    class_noun,
                                    captions,
                                    masks,
                                    name,
                                    steps,
                                    *boxes.values(),
                                ],
                                outputs=[start_note],
                            )

                    with gr.Column():
                        progress = gr.HTML(progress_html(None), elem_id="train-progress")
                        validation = gr.Gallery(label="validation images", columns=4, height=200)
                        with gr.Row():
                            cancel_train = gr.Button("Cancel training", elem_id="cancel-train")
                            resumable = gr.Dropdown([], label="interrupted trainings", elem_id="resumable")
                            resume_train = gr.Button("Resume", elem_id="resume-train")
                        train_note = gr.Markdown()

                def cancel_latest():
                    job = latest(queue, TRAIN)
                    if job is None or job.state in FINISHED:
                        return "no training is running"
                    return queue.cancel(job.id)

                cancel_train.click(cancel_latest, outputs=[train_note])
                resume_train.click(
                    lambda j: queue.resume(int(j)) if j else "pick an interrupted training", [resumable], [train_note]
                )

            # ---------------------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        g_concepts = gr.Dropdown(
                            concept_choices(library), multiselect=True, label="concepts", elem_id="g-concepts"
                        )
                        g_tokens = gr.Markdown()
                        with gr.Row():
                            g_refs = gr.File(
                                label="reference images (optional): the subject, encoded as you generate",
                                file_count="multiple",
                                file_types=["image"],
                                elem_id="g-refs",
                            )
                            encoders = encoder_methods()
                            g_encoder = gr.Dropdown(
                                encoders,
                                value=encoders[0] if encoders else None,
                                label="encoder method for the references",
                                elem_id="g-encoder",
                            )
                        g_encoder_settings = gr.Textbox(
                            label="encoder settings for the references: KEY=VALUE, one a line (e.g. subject_scale=2)",
                            lines=1,
                            elem_id="g-encoder-settings",
                        )
                        g_prompt = gr.Textbox(label="prompt", value="a red ball on the beach", elem_id="g-prompt")
                        use_tokens = gr.Button("Add the concepts' tokens to the prompt", size="sm")
                        g_negative = gr.Textbox(label="negative prompt")
                        with gr.Row():
                            g_seed = gr.Number(0, label="seed", precision=0)
                            g_steps = gr.Number(25, label="steps", precision=0, elem_id="g-steps")
                            g_guidance = gr.Number(5.0, label="guidance")
                            g_n = gr.Number(4, label="images", precision=0, elem_id="g-n")
                        with gr.Row():
                            g_scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="scheduler")
                            g_height = gr.Number(None, label="height (empty: native)", precision=0)
                            g_width = gr.Number(None, label="width (empty: native)", precision=0)
                        with gr.Row():
                            g_regions = gr.Checkbox(label="regional prompts (BREAK between regions)")
                            g_layout = gr.Number(None, label="layout steps (empty: the method's)", precision=0)
                        g_go = gr.Button("Generate", variant="primary", elem_id="generate")
                        g_note = gr.Markdown(elem_id="g-note")
                    with gr.Column():
                        g_gallery = gr.Gallery(
                            label="images", columns=4, height=320, elem_id="g-gallery", elem_classes="pixelated"
                        )
                        g_command = gr.Code(label="draw them again", language="shell")
                        g_files = gr.File(label="download (PNGs with their parameters, grid, JSON record)")
                        g_record = gr.JSON(label="record")

                g_concepts.change(tokens_note, [g_concepts], [g_tokens])
                use_tokens.click(prompt_with_tokens, [g_prompt, g_concepts], [g_prompt])

                def submit_generate(
                    prompt,
                    negative,
                    seed,
                    steps_,
                    guidance,
                    n,
                    scheduler,
                    h,
                    w,
                    regions,
                    layout,
                    cs,
                    refs,
                    encoder,
                    sets,
                ):
                    if not prompt.strip():
                        return "**error:** write a prompt"
                    images = []
                    if refs:  # kept in the library (read and checked as a subject's images) until the job runs
                        if not encoder:
                            return "**error:** pick the encoder method that reads the reference images"
                        folder = library / lib.UPLOADS / lib.unique_name(library / lib.UPLOADS, "generate")
                        try:
                            lib.save_references(folder, [Path(getattr(f, "name", f)) for f in refs])
                        except LimnerError as e:
                            return f"**error:** {e}"
                        images = [str(p) for p in sorted(folder.glob("*.png"))]
                    params = {
                        "prompt": prompt,
                        "negative": negative,
                        "seed": int(seed or 0),
                        "steps": int(steps_ or 25),
                        "guidance": float(guidance if guidance is not None else 5.0),
                        "num_images": int(n or 1),
                        "scheduler": scheduler,
                        "height": optional_int(h),
                        "width": optional_int(w),
                        "regions": bool(regions),
                        "layout_steps": None if layout in (None, "") else int(layout),
                        "concepts": list(cs or []),
                        **({"images": images, "method": encoder} if images else {}),
                    }
                    settings = [line.strip() for line in (sets or "").splitlines() if line.strip()]
                    if settings and not images:
                        return "**error:** encoder settings are for reference images: add some, or clear the settings"
                    try:
                        for item in settings:
                            parse_setting(item, "encoder settings")
                    except LimnerError as e:
                        return f"**error:** {e}"
                    if settings:
                        params["settings"] = settings
                    params["command"] = generate_command(params)
                    try:
                        job_id = queue.submit(GENERATE, params)
                    except LimnerError as e:  # the queue is full
                        return f"**error:** {e}"
                    queue.store.update(job_id, params=dict(params, out=str(queue.folder(job_id) / "images")))
                    return f"job {job_id} queued"

                g_go.click(
                    submit_generate,
                    [g_prompt, g_negative, g_seed, g_steps, g_guidance, g_n, g_scheduler, g_height, g_width]
                    + [g_regions, g_layout, g_concepts, g_refs, g_encoder, g_encoder_settings],
                    [g_note],
                )

            # ---------------------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column():
                        c_concepts = gr.Dropdown(
                            concept_choices(library), multiselect=True, label="concepts", elem_id="c-concepts"
                        )
                        c_template = gr.Textbox(
                            "a {} on the beach", label="prompt ({} is each concept's words)", elem_id="c-template"
                        )
                        with gr.Row():
                            c_seed = gr.Number(0, label="seed", precision=0)
                            c_steps = gr.Number(25, label="steps", precision=0, elem_id="c-steps")
                            c_guidance = gr.Number(5.0, label="guidance")
                            c_n = gr.Number(2, label="images per concept", precision=0, elem_id="c-n")
                        c_go = gr.Button("Compare", variant="primary", elem_id="compare")
                        c_note = gr.Markdown(elem_id="c-note")
                    with gr.Column():
                        c_grid = gr.Image(
                            label="side by side (one column per concept)", elem_id="c-grid", type="filepath"
                        )
                        c_gallery = gr.Gallery(label="each concept", columns=4, height=240, elem_classes="pixelated")

                def submit_compare(template, cs, seed, steps_, guidance, n):
                    if len(cs or []) < 1 or "{}" not in template:
                        return "**error:** pick concepts, and put {} in the prompt where each concept's words go"
                    params = {
                        "template": template,
                        "concepts": list(cs),
                        "seed": int(seed or 0),
                        "steps": int(steps_ or 25),
                        "guidance": float(guidance if guidance is not None else 5.0),
                        "num_images": int(n or 1),
                    }
                    job_id = queue.submit(COMPARE, params)
                    queue.store.update(job_id, params=dict(params, out=str(queue.folder(job_id) / "compare")))
                    return f"job {job_id} queued"

                c_go.click(submit_compare, [c_template, c_concepts, c_seed, c_steps, c_guidance, c_n], [c_note])

            # ---------------------------------------------------------------------------- Library
            with gr.Tab("Library", id="library"):
                with gr.Row():
                    l_pick = gr.Dropdown(
                        [(e.label, str(e.path)) for e in lib.entries(library)],
                        label="concepts and adapters",
                        elem_id="l-pick",
                        scale=3,
                    )
                    l_refresh = gr.Button("Refresh", scale=1)
                with gr.Row():
                    with gr.Column():
                        l_info = gr.Dataframe(headers=["field", "value"], interactive=False, elem_id="l-info")
                        l_plot = gr.Image(label="loss", type="filepath")
                        l_samples = gr.Gallery(label="samples", columns=4, height=160, elem_classes="pixelated")
                    with gr.Column():
                        l_card = gr.Markdown(elem_id="l-card")
                        with gr.Row():
                            l_new = gr.Textbox(label="new name", scale=2)
                            l_rename = gr.Button("Rename", scale=1)
                        with gr.Row():
                            l_export = gr.Button("Export (zip)")
                            l_delete = gr.Button("Delete", variant="stop", elem_id="l-delete")
                        with gr.Row(visible=False) as l_confirm_row:
                            l_confirm_text = gr.Markdown()
                            l_confirm = gr.Button("Yes, delete it", variant="stop", elem_id="l-confirm")
                            l_keep = gr.Button("Keep it")
                        l_zip = gr.File(label="export", elem_id="l-zip")
                        l_note = gr.Markdown(elem_id="l-note")

                def show_entry(path):
                    if not path:
                        return [], None, [], ""
                    e = lib.find(library, path)
                    rows = [[k, "" if v is None else str(v)] for k, v in lib.summary(e).items()]
                    plot = lib.loss_plot(e, library / ".plots" / f"{e.name}-{int(time.time() * 1000)}.png")
                    return rows, str(plot) if plot else None, [str(p) for p in lib.samples(e)], lib.card(e)

                def entry_choices(value=None):
                    choices = [(e.label, str(e.path)) for e in lib.entries(library)]
                    return gr.update(choices=choices, value=value if value in [c[1] for c in choices] else None)

                l_pick.change(show_entry, [l_pick], [l_info, l_plot, l_samples, l_card])
                l_refresh.click(entry_choices, [l_pick], [l_pick])

                def rename(path, new):
                    try:
                        target = lib.rename(lib.find(library, path), new)
                    except LimnerError as e:
                        return gr.skip(), f"**error:** {e}"
                    return entry_choices(str(target)), f"renamed to `{target.name}`"

                l_rename.click(rename, [l_pick, l_new], [l_pick, l_note])
                l_delete.click(
                    lambda p: (gr.update(visible=bool(p)), f"Delete **{Path(p).name}** and its files?" if p else ""),
                    [l_pick],
                    [l_confirm_row, l_confirm_text],
                )
                l_keep.click(lambda: gr.update(visible=False), None, [l_confirm_row])

                def delete(path):
                    e = lib.find(library, path)
                    lib.delete(e)
                    return gr.update(visible=False), entry_choices(), f"deleted `{e.name}`"

                l_confirm.click(delete, [l_pick], [l_confirm_row, l_pick, l_note])
                l_export.click(
                    lambda p: str(lib.export(lib.find(library, p), library / ".exports")) if p else None,
                    [l_pick],
                    [l_zip],
                )

            # ---------------------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    with gr.Column():
                        e_concept = gr.Dropdown(concept_choices(library), label="concept", elem_id="e-concept")
                        e_subjects = gr.Textbox(
                            label="subjects: world:NAME (the world bench) or a folder of reference images",
                            placeholder="default: the concept's own world subject",
                        )
                        with gr.Row():
                            e_images = gr.Number(1, label="images per prompt", precision=0)
                            e_prompts = gr.Number(4, label="prompts (empty: all)", precision=0)
                            e_steps = gr.Number(25, label="steps", precision=0)
                        e_go = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
                        e_note = gr.Markdown()
                    with gr.Column():
                        e_table = gr.Markdown(elem_id="e-table")
                        e_plots = gr.Gallery(label="fidelity vs prompt", columns=2, height=260)
                e_report = gr.HTML()

                def submit_eval(concept, subjects, images, prompts, steps_):
                    if not concept:
                        return "**error:** pick a concept"
                    manifest = lib.find(library, concept).manifest
                    subjects = subjects.strip() or (
                        f"world:{manifest['subject']}" if manifest.get("subject") in world_subjects() else ""
                    )
                    if not subjects:
                        return "**error:** name the subjects to evaluate on (a folder of reference images)"
                    params = {
                        "concept": concept,
                        "concept_name": Path(concept).name,
                        "subjects": subjects,
                        "images": int(images or 1),
                        "prompts": optional_int(prompts),
                        "steps": int(steps_ or 25),
                    }
                    job_id = queue.submit(EVAL, params)
                    queue.store.update(job_id, params=dict(params, out=str(queue.folder(job_id) / "report")))
                    return f"job {job_id} queued"

                e_go.click(submit_eval, [e_concept, e_subjects, e_images, e_prompts, e_steps], [e_note])

        # -------------------------------------------------------------------------------- Jobs (every tab)
        with gr.Accordion("Jobs", open=True):
            jobs = gr.Dataframe(
                headers=["id", "kind", "state", "name", "progress", "created", "error"],
                value=jobs_rows(queue),
                interactive=False,
                elem_id="jobs",
            )
            with gr.Row():
                job_pick = gr.Number(label="job", precision=0, elem_id="job-pick")
                job_cancel = gr.Button("Cancel job")
                job_resume = gr.Button("Resume / run again")
                job_note = gr.Markdown()
            job_log = gr.Textbox(label="log of the picked job (last lines)", lines=4, max_lines=8)
        job_cancel.click(lambda j: queue.cancel(int(j)) if j else "pick a job", [job_pick], [job_note])
        job_resume.click(lambda j: queue.resume(int(j)) if j else "pick a job", [job_pick], [job_note])

        def job(job_id: int) -> dict:
            """A job's state, parameters, result (its files) and error: what a script that submitted work through
            this page's API reads back (gradio_client or `POST /gradio_api/call/job`)."""
            found = queue.store.get(int(job_id))
            if found is None:
                return {"id": int(job_id), "state": None, "error": f"no job {job_id}"}
            return {k: getattr(found, k) for k in ("id", "kind", "state", "params", "result", "error", "progress")}

        gr.api(job, api_name="job")

        # -------------------------------------------------------------------------------- refresh
        def tick(state: dict, picked):
            state = dict(state or {})
            t = latest(queue, TRAIN)
            out: list[Any] = [fresh(state, "jobs", jobs_rows(queue)), fresh(state, "progress", progress_html(t))]
            out.append(fresh(state, "validation", t.progress.get("validation", []) if t else []))
            resumable_ids = [
                (f"job {j.id}: {j.name} ({j.state})", j.id) for j in queue.store.list(kinds=(TRAIN,), states=RESUMABLE)
            ]
            out.append(fresh(state, "resumable", gr.update(choices=resumable_ids), resumable_ids))
            # concept lists change when a training finishes, or a concept is renamed or deleted
            concepts = concept_choices(library)
            for key in ("g", "c", "e"):
                out.append(fresh(state, f"concepts-{key}", gr.update(choices=concepts), concepts))
            g = latest(queue, GENERATE)
            done_g = g is not None and g.state == "done"
            out.append(fresh(state, "g-gallery", g.result.get("images", []) if done_g else [], g and (g.id, g.state)))
            out.append(fresh(state, "g-command", g.params.get("command", "") if g else ""))
            files = ([*g.result["images"], g.result["grid"], g.result["record"]]) if done_g else None
            out.append(fresh(state, "g-files", files))
            record = json.loads(Path(g.result["record"]).read_text()) if done_g else None
            out.append(fresh(state, "g-record", record, g and (g.id, g.state)))
            c = latest(queue, COMPARE)
            done_c = c is not None and c.state == "done"
            out.append(fresh(state, "c-grid", c.result.get("grid") if done_c else None))
            captioned = (
                [
                    (img, f"{Path(col['concept']).name}: {col['prompt']}")
                    for col in c.result["columns"]
                    for img in col["images"]
                ]
                if done_c
                else []
            )
            out.append(fresh(state, "c-gallery", captioned))
            ev = latest(queue, EVAL)
            done_e = ev is not None and ev.state == "done"
            table = Path(ev.result["markdown"]).read_text() if done_e else (f"job {ev.id}: {ev.state}" if ev else "")
            out.append(fresh(state, "e-table", table))
            out.append(fresh(state, "e-plots", ev.result.get("plots", []) if done_e else []))
            frame = (
                f"<iframe src='{file_url(ev.result['report'])}' style='width:100%;height:640px;border:1px solid #ddd'>"
                "</iframe>"
                if done_e
                else ""
            )
            out.append(fresh(state, "e-report", frame))
            log = ""
            if picked:
                path = queue.folder(int(picked)) / "log.txt"
                if path.exists():
                    log = "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-8:])
            out.append(fresh(state, "log", log))
            return [state, *out]

        timer.tick(
            tick,
            [seen, job_pick],
            [seen, jobs, progress, validation, resumable, g_concepts, c_concepts, e_concept]
            + [g_gallery, g_command, g_files, g_record, c_grid, c_gallery, e_table, e_plots, e_report, job_log],
            show_progress="hidden",
        )
    return demo


def setting_box(key: str, default: Any, help_text: str) -> gr.components.Component:
    """A form field for one setting: a checkbox for a flag, else text that the command parses as it parses
    `--set key=value` (so this page and the command line accept the same values). Interactive by decree:
    gradio infers it from the events a field feeds, and this form's event is made after the page loads."""
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=key, info=help_text, elem_id=f"setting-{key}", interactive=True)
    text = "" if default is None else str(default)
    return gr.Textbox(value=text, label=key, info=help_text, max_lines=1, elem_id=f"setting-{key}", interactive=True)


def personalize_params(
    queue: JobQueue,
    method: str,
    source: str,
    files: list[Any] | None,
    subject: str | None,
    class_noun: str | None,
    captions: str | None,
    masks: list[Any] | None,
    name: str | None,
    steps: Any,
) -> dict[str, Any]:
    """A training job's parameters from the Personalize form; uploads become a subject folder in the library."""
    concepts = queue.library / lib.CONCEPTS
    if source == "upload":
        if not files:
            raise LimnerError("upload reference images (or choose 'world-bench subject')")
        if not (class_noun or "").strip():
            raise LimnerError("name the class noun of the uploaded subject (e.g. dog, cup, person)")
        base_name = lib.safe_name(name) if name and name.strip() else f"subject-{method}"
        folder = queue.library / lib.UPLOADS / lib.unique_name(queue.library / lib.UPLOADS, base_name)
        lines = (captions or "").splitlines()
        lib.save_references(
            folder,
            [Path(getattr(f, "name", f)) for f in files],
            lines,
            [Path(getattr(m, "name", m)) for m in masks or []],
        )
        subject_spec = str(folder)
    else:
        if not subject:
            raise LimnerError("pick a world-bench subject")
        base_name = lib.safe_name(name) if name and name.strip() else f"{subject}-{method}"
        subject_spec = f"world:{subject}"
    out = concepts / lib.unique_name(concepts, base_name)
    out.mkdir(parents=True)  # holds the name for this job while others are queued
    steps_value = optional_int(steps)
    if steps_value is not None and steps_value < 1:
        raise LimnerError(f"steps {steps_value}: at least 1")
    return {
        "name": out.name,
        "method": method,
        "subject": subject_spec,
        "class_noun": (class_noun or "").strip() or None,
        "steps": steps_value,
        "out": str(out),
    }
