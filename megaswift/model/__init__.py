from .embedded import EMBEDDED_MODELS, find_embedded
from .loader import load_causal_lm, load_tokenizer, parse_dtype
from .resolve import (ModelFolderError, ModelNotFoundError, ModelWeightsError, check_model_weights, read_model_config,
                      resolve_model_dir)

__all__ = ['EMBEDDED_MODELS', 'find_embedded', 'load_causal_lm', 'load_tokenizer', 'parse_dtype',
           'ModelFolderError', 'ModelNotFoundError', 'ModelWeightsError', 'check_model_weights', 'read_model_config',
           'resolve_model_dir']
