from .base import IGNORE_INDEX, MaxLengthExceeded, Template, TemplateError
from .registry import get_template, infer_template_name, templates
from .segments import Segment

__all__ = ['IGNORE_INDEX', 'MaxLengthExceeded', 'Template', 'TemplateError', 'get_template', 'infer_template_name',
           'templates', 'Segment']
