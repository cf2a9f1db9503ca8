"""Applications built on :class:`~llava_local.VisionChat`: the jobs behind the CLI.

Each module is one job a Python user can call too: :mod:`.captioning` (a folder of
pictures to JSON Lines or Parquet, on one machine or a Ray cluster; :mod:`.caption` and
:mod:`.caption_ray` keep its old names), :mod:`.eval` (accuracy on labelled pictures),
:mod:`.bench` (timings), :mod:`.doctor` (what this machine can run), :mod:`.ui` (the web
page; :mod:`.ui_access` who may use it, :mod:`.ui_uploads` what an upload may cost),
:mod:`.serve` (the engine behind OpenAI- and Ollama-compatible HTTP routes),
:mod:`.datasets` (labelled picture sets) and :mod:`.models` (listing and pulling
models); :mod:`.engines` is the engine pool the page, ``serve`` and Ray workers open
their engines in (one per plan). They use the core and the engines; the core and the
engines never import them (checked by import-linter).
"""
