"""The opd lab: a small controlled world (multi-step addition) and a zoo of self-trained models.

`opd.lab.world` defines the tasks, patterns and verifier; `opd.lab.zoo` builds, ships and checks the
models that OPD experiments use (``lab:student``, ``lab:teacher_novel``, ...).
"""
