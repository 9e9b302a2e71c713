"""Benchmark: top-1 against activation memory on real data, ASI vs vanilla, HOSVD and gradient filtering.

Transfer cases, each fine-tuning the last 2 and the last 4 convs plus the head (everything else
frozen, BatchNorm in eval), all in one run:

- EfficientNet-Lite0 with its packaged ImageNet weights, on Fashion-MNIST;
- MobileNetV2 pretrained here on Fashion-MNIST (``odl-fed pretrain``'s code path; the checkpoint
  is cached under ``runs/``), on the 5,000 real MNIST digits.

Methods: vanilla backprop; pure ASI (``asi-only``) with ranks planned by ``plan_ranks`` under
budgets given as fractions of vanilla's measured activation bytes (default grid, and the paper's
grid at the reference budgets); the planner's choice at the same budgets (``plan_ranks(...,
exact=True)`` trained with method ``asi``: layers stay exact where the budget allows, the rest
hold ASI at planned ranks); HOSVD at ``asi-only``'s ranks (reference budgets only: its steps are
most of the run's time); gradient filtering (r x r patches); head only.
Per run: top-1, the bytes the trained convs save for backward
(measured with ``saved_tensors_hooks``), training FLOPs of a step (forward + backward), step time;
each also as a ratio to vanilla from the same run (step times interleaved across methods so
they share the machine's noise). Besides: ASI's compression against HOSVD's at the same ranks
(time and FLOPs per step, on the trained layers' real inputs) and the time to plan ranks; and, for
each case and budget, whether the planner's row is on the Pareto front of every method's rows
(top-1 against the convs' saved bytes, within 0.5 pp: :func:`pareto_check`).

Speed on a CPU: the frozen prefix runs once per image (``bench.tail.cache_features``), and every
method trains the fine-tuned tail over those cached features (``bench.tail.Tail``), through the
library's own loop (``odl_fed.training.task.train_steps``).

Accuracy as a paper measures it (``configs/bench/accuracy_seeds.yaml``): several training seeds
(``seeds``; top-1 as mean and standard deviation), the test top-1 after every epoch, and a
learning-rate check per method (a case's ``lrs``: the best validation top-1 on a split carved from
the training set, never the test set).

Layout: ``settings`` (the YAML, read once), ``train`` (a method's tail and its fine-tuning),
``run`` (cases, groups, plans, timing), ``report`` (tables, checks, JSON, ``--merge``), ``plot``,
``__main__`` (the command line).

Run: ``python -m bench.accuracy`` (settings in ``configs/bench/accuracy.yaml``; ``--quick`` for a
small version; ``--help``). On a crowded machine, parts can run side by side (``--cases``,
``--layers``, each with its own ``--out``) and be joined by ``--merge`` into one report.
"""

import os

# OpenMP threads that spin at barriers stall LAPACK calls (eigh, QR) by up to 100x on a 2-core
# machine while another process runs (measured here: an eigh of 1152 x 1152 in 18 s instead of
# 0.2 s); passive waiting keeps the timings sane. Read once, when torch loads: this package's
# modules all import torch after this runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
