"""Evaluation programs that read exported checkpoints (never the trainer's internals).

``python -m evals.run`` (one export, one protocol), ``python -m evals.watch`` (follow a run),
``python -m evals.report`` (Markdown table beside the papers' numbers). Protocols: ``knn``,
``linear`` / ``linear_dino``, ``finetune``, ``zeroshot``, ``retrieval`` (configs in ``configs/eval/``).
See ``evals/README.md``.
"""
