"""PersonaPlex in plain PyTorch: the LM, Mimi, their per-slot streaming state, loading and prompts.

MODEL_CODE_VERSION names the numerics of the code that turns weights and a persona prompt into a
prompt state (lm.py, lm_state.py, streaming.py, rope.py, prompts.py, lm_checkpoint.py and what
they import). Bump it with any change that alters a computed number, however slightly: it is part
of the persona cache key, so a bump makes every worker recompute its cached persona states instead
of serving stale ones. tests/worker/model/test_code_version.py holds a golden prefill for the
current version and fails when the numerics move without a bump.

1: the first versioned numerics: attention everywhere as the reference's streaming ring.
"""

MODEL_CODE_VERSION = 1
