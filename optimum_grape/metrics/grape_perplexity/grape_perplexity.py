"""grape_perplexity: perplexity of a causal LM on texts, offline, as optimum-grape measures it.

Each text is tokenized, cut to its first `max_tokens` tokens, and scored in non-overlapping windows
of `window` tokens from the model's own next-token loss; every predicted token counts equally.
Unlike the Hub's `perplexity` module, it takes a model object or a local folder and never downloads.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model: a loaded causal LM, or a local folder ("default": the model shipped with optimum-grape).
    tokenizer: its tokenizer (loaded from the folder when `model` is a path).
    window (int): tokens per scored window (default 256).
    max_tokens (int): score at most this many tokens of each text (default: all).
    batch_size (int): windows per forward pass (default 8).
Returns:
    perplexities: one per text; perplexity: over all texts, token-weighted; num_tokens: predicted tokens per text.
Examples:
    >>> ppl = evaluate.load(optimum_grape.metrics.module_path("grape_perplexity"))
    >>> ppl.compute(predictions=["In the beginning God created the heaven and the earth."], model="default")
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GrapePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric", description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2604.06542"])

    def _compute(self, predictions, model, tokenizer=None, window=256, max_tokens=None, batch_size=8):
        from optimum_grape.evaluation.perplexity import text_perplexities
        from optimum_grape.checkpoint.load import load_model_and_tokenizer

        if isinstance(model, str):
            model, tokenizer = load_model_and_tokenizer(model, tokenizer)
        if tokenizer is None:
            raise ValueError("grape_perplexity: pass tokenizer= with a model object (or model= a folder).")
        return text_perplexities(model, tokenizer, predictions, window=window, max_tokens=max_tokens,
                                 batch_size=batch_size)
