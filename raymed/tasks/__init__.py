"""What ``data.task`` makes of a run, behind one interface, in one registry (like the data sources).

Every dataset has a task of its own (classification, VQA: :mod:`raymed.data.tasks`); ``data.task``
says what the run asks of those datasets instead: ``classification`` (their own task),
``superresolution`` (each image's ×``data.sr_scale`` super-resolution) or ``report`` (report
generation: :mod:`raymed.tasks.report`, a package holding its text sources, tokenizer, model and
metrics). The engine, the shard writer and the methods reach a run task's extras only through the hooks of
:class:`~raymed.tasks.base.RunTask`, looked up in :mod:`raymed.tasks.registry`; a new one is one
module (or package) with one ``@register_task`` class, imported by the registry. This package
imports nothing itself.
"""
