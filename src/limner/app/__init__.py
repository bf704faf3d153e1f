"""`limner app`: a browser UI over limner's library, for every method in the registry.

A thin layer: the pages collect what the command line's options say and hand it to the same functions
(`limner train` runs as a child process, so a training can be cancelled, resumed and outlive a page;
generation calls the `generate` command's body in the server), so nothing here knows how a method trains
or draws. Modules:

- `db`: the jobs' state in SQLite beside the library (a reload or restart loses nothing);
- `jobs`: the queue (one training or evaluation at a time, several generations) and its workers;
- `tasks`: what each kind of job runs, and the progress read from a training's own output;
- `library`: the concepts and adapters on disk (card, loss plot, samples; rename, delete, export);
- `ui`: the gradio pages; `server`: binding, the queue's start and gradio's launch.

gradio is an optional dependency (`pip install 'limner[app]'`): only `ui` and `server` import it.
"""
