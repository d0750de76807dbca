"""``make bench``: how fast editing and evaluation are, batched against one case at a time.

``python -m bench --cases 64 --batch 32`` times each stage of an edit (target vectors, keys, the
least-squares solve, evaluation scoring, generation once ``evaluation/generation.py`` exists) and
whole MEMIT / CoME-MEMIT runs, each twice in the same process: the fast path, and the same code
forced to one case at a time (target vectors optimised one request at a time, evaluation at batch
size 1), which is how the reference implementations work. It prints a table and writes JSON
(``bench/results/<timestamp>.json`` or ``--out``). See ``bench/run.py`` and the stage list in
``bench/stages.py``. Not part of the test suite.
"""
