"""Accuracy as an `evaluate` metric script, shipped with peft-fed so that loading it needs no network.

Computed as `float(mean(predictions == references))`, the formula peft-fed used before it went through `evaluate`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Share of predictions equal to their reference (class id, choice index or token id)."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted ids.
    references (`list[int]`): gold ids, as many as predictions.
Returns:
    accuracy (`float`): in [0, 1]; NaN for no items.
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if references.size == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float((predictions == references).mean())}
