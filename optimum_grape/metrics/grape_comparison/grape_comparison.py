"""grape_comparison: a pruned model's perplexities against its unpruned base's, item by item.

Returns each ratio (pruned / unpruned), the worst one, their geometric mean and, given
`max_ratio`, whether every ratio stays within it: the gate `optimum-grape publish` applies before
uploading a variant.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): perplexities of the pruned model (one per text or domain).
    references (list of float): perplexities of the unpruned model on the same texts.
    max_ratio (float, optional): the largest acceptable ratio.
Returns:
    ratios, max_ratio, mean_ratio (geometric), and within_threshold when max_ratio is given.
Examples:
    >>> cmp = evaluate.load(optimum_grape.metrics.module_path("grape_comparison"))
    >>> cmp.compute(predictions=[31.0, 40.0], references=[29.0, 33.5], max_ratio=1.5)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GrapeComparison(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="comparison", description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://arxiv.org/abs/2604.06542"])

    def _compute(self, predictions, references, max_ratio=None):
        from optimum_grape.evaluation.perplexity import compare_perplexities

        return compare_perplexities(predictions, references, max_ratio=max_ratio)
