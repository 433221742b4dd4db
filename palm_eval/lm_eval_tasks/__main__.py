"""`python -m palm_eval.lm_eval_tasks` prints the directory for `lm_eval --include_path`."""

from palm_eval.lm_eval_tasks import include_path

print(include_path())
