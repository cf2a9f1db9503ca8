"""Client prompts to choose the next recipe on: neither trained nor held out.

Run 20 was judged on ``llava_local.apps.wrappers.HELD_OUT``, the test of how the demo
copes with software it never saw; choosing a recipe on those figures would make them a
score the model was fitted to. These wrappers are a third set, written like the ones
real clients send (a schema in the system prompt or the user's text, an instruction
after or before the question, a product's system prompt), sharing no text with either
(``tests/dev/test_demo_prompts.py``). ``evaluate_demo.py``'s ``wrapped_validation`` asks
them about shapes drawn from :data:`SHAPES_SEED`, a seed neither training nor the
test set uses, and about the validation digits (1250-1399: what a client's text does to
the answer's form shows on them whether or not the pair was trained on them).
"""

from __future__ import annotations

from llava_local.apps.wrappers import Wrapper

#: Shapes for the validation figures (training draws from 0 and 1000, the built-in
#: test set from 20251122).
SHAPES_SEED = 2000

VALIDATION: tuple[Wrapper, ...] = (
    Wrapper(
        name="val-extractor-system",
        source="an extraction library's system prompt with the schema",
        system="You turn what you see into data. Emit exactly one JSON value "
        "conforming to {schema}",
    ),
    Wrapper(
        name="val-form-after-question",
        source="a library that puts the expected form after the question",
        user="{question}\nGive back a JSON value of this form:\n{schema}",
        schema_style="python-indent",
    ),
    Wrapper(
        name="val-schema-first",
        source="the schema before the task in the user's text",
        user="Expected reply layout ->\n{schema}\n\nTask: {question}",
        schema_style="javascript",
    ),
    Wrapper(
        name="val-json-mode-system",
        source="a schema in the system prompt and an any-object grammar",
        system="Answer in machine-readable form that validates against {schema}",
        grammar="object",
    ),
    Wrapper(
        name="val-brief-suffix",
        source="an instruction after the question",
        user="{question}\n\nRespond using a brief statement.",
    ),
    Wrapper(
        name="val-words-suffix",
        source="an instruction after the question, on the same line",
        user="{question} Limit your reply to a handful of words.",
    ),
    Wrapper(
        name="val-photo-prefix",
        source="a question introduced by the user's text",
        user="Take a look at the photo I sent.\n{question}",
    ),
    Wrapper(
        name="val-example-schema",
        source="a library that shows an example schema and its instance before the task's "
        "(LangChain's, held out, made run 34 answer digits with a colour key; this one did not)",
        user="Machine-readable output expected. Illustration: given the layout "
        '{"properties": {"mood": {"type": "string"}}} an acceptable reply is '
        '{"mood": "calm"}, while {"properties": {"mood": "calm"}} is not.\n'
        "Layout for this reply:\n{schema}\n\n{question}",
        schema_style="langchain",
    ),
    Wrapper(
        name="val-worked-example",
        source="a worked example (a schema with a description, a fitting instance and a "
        "wrong one) before the task's schema and the question (run 34: 0.80 on digits "
        "1250-1289 in PyTorch, wrong digits; written after run 34's test, runs 35 and 36 "
        "were chosen with it)",
        user="Respond to the request.\nWrite JSON that fits the layout given below.\n\n"
        'For the layout {"properties": {"mood": {"title": "Mood", "description": "mood '
        'words", "type": "array", "items": {"type": "string"}}}, "required": ["mood"]}\n'
        'the value {"mood": ["calm", "keen"]} matches it. The value {"properties": {"mood": '
        '["calm", "keen"]}} does not match.\n\nSchema to use:\n```\n{schema}\n```\n{question}\n',
        schema_style="langchain",
    ),
    Wrapper(
        name="val-product-system",
        source="a photo app's own system prompt",
        system="You are Aria, the helper inside a photo gallery app. Assist people with "
        "their pictures in a warm tone.",
    ),
)
