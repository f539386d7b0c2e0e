from .embedded import EMBEDDED_MODELS, find_embedded
from .loader import load_causal_lm, load_tokenizer, parse_dtype
from .resolve import ModelNotFoundError, ModelWeightsError, check_model_weights, resolve_model_dir

__all__ = ['EMBEDDED_MODELS', 'find_embedded', 'load_causal_lm', 'load_tokenizer', 'parse_dtype',
           'ModelNotFoundError', 'ModelWeightsError', 'check_model_weights', 'resolve_model_dir']
