"""Development tools of llava-local, kept out of the library's wheel.

- :mod:`llava_local_dev.gguf_writer`: LLaVA-style GGUF pairs from numpy (test models,
  benchmark twins, the demo model's export), and the numpy reference of llama.cpp's
  vision graph (:func:`~llava_local_dev.gguf_writer.reference_image_embeddings`).
- :mod:`llava_local_dev.reference`: the numpy reference of the language model, and
  reading a pair's weights back from its files.
- :mod:`llava_local_dev.mtmd`: :class:`~llava_local_dev.mtmd.MtmdRunner`, llama.cpp's
  libmtmd driven directly (logits, image embeddings, greedy answers).
- :func:`~llava_local_dev.pictures.png_bytes`: test pictures.

Installed by ``make test`` (``pip install -e ./dev``); it needs the ``gguf`` package,
which the library itself never imports.
"""
