"""Closed-loop continual-merging benchmark (CARVE Table 2 protocol on Meta-World).

Experts are admitted one at a time; after each admission every method's served model is started
behind the real gRPC policy server and every admitted skill's tasks are run in Meta-World through
the real client, with the oracle skill id and (optionally) through the server's text router. The
per-step success matrix ``acc[t][i]`` gives the final average success and the backward transfer
``BWT = mean_i (acc[T][i] - acc[i][i])``.

Modules: ``methods`` (benchmark method specs), ``run`` (the runner), ``report`` (Markdown, JSON and
PNG plots). Command line: ``carve bench closed-loop`` (``policy_server/cli/bench.py``).
"""
