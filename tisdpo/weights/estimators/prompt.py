"""TIS-DPO(P): one model (the model training starts from), two system prompts;
r_t = log π(y_t | p+, x, y<t) − log π(y_t | p−, x, y<t)."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.weights.contrast import contrast_scores, contrastive_rows
from tisdpo.weights.estimators.common import check_scoring
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


def prompt_scores(inputs: EstimatorInputs):
    node = inputs.node
    model = inputs.load_model(None)
    positive_rows, negative_rows = contrastive_rows(inputs.rows, task=inputs.task, template=node.get("template"),
                                                    positive_prompt=node.get("positive_prompt"),
                                                    negative_prompt=node.get("negative_prompt"))
    positive_examples = inputs.tokenize(positive_rows, "prompt+")
    negative_examples = inputs.tokenize(negative_rows, "prompt-")
    if len(positive_examples) != len(inputs.examples) or len(negative_examples) != len(inputs.examples):
        raise checks.ConfigError(
            "estimator=prompt: adding the system prompts made some responses fully truncated; "
            "raise dataset.max_length or shorten estimator.positive_prompt/negative_prompt"
        )
    positive = inputs.response_logps(model, positive_examples)
    negative = inputs.response_logps(model, negative_examples)
    return contrast_scores(positive, negative, inputs.lengths)


ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=prompt_scores, check=check_scoring)
