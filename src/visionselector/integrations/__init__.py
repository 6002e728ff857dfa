"""Integrations with other tools, each in its own module and each importing its tool only when used.

* :mod:`visionselector.integrations.lmms_eval`: the ``visionselector`` model of lmms-eval
  (``pip install "visionselector[lmms-eval]"``; see ``docs/lmms-eval.md``).
"""
