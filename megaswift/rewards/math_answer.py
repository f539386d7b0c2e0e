"""Final-answer extraction and equivalence for math rewards, without the ``math_verify`` package.

Extraction (:func:`extract_answer`): the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces),
else the last ``<answer>...</answer>``, else a GSM8K-style ``#### x`` tail, else the last number.
A gold ``solution`` may be a full worked solution or a bare answer (:func:`extract_gold_answer`).

Equivalence (:func:`answers_equal`): equal normalised strings, else equal numbers (relative
tolerance; ``50%`` also matches ``0.5``), else element-wise for comma-separated tuples, else a
sympy check on short expressions whose identifiers are single letters or a few known functions.
No signals or timeouts are used (safe in threads); inputs to sympy are kept short and free of
large powers instead.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache

_BOX_CMDS = ('\\boxed', '\\fbox')
_NUM_RE = re.compile(r'(?:(?<![\w).])-)?(?:\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+)')  # '-' is a sign, not minus
_ANSWER_TAG_RE = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
_PROSE_RE = re.compile(r'(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}(?![A-Za-z{])')
REL_TOL = 1e-6
MAX_SYMPY_CHARS = 64


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (braces balanced), or None.

    ``\\boxed 5`` (no braces) yields ``5``; an unclosed brace yields None.
    """
    if not text:
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_CMDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_CMDS if text.startswith(c, start))
    i = start + len(cmd)
    if text.startswith(' ', i):
        m = re.match(r'\s+([^\s$]+)', text[i:])
        return m.group(1) if m else None
    if not text.startswith('{', i):
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == '{':
            depth += 1
        elif ch == '}':
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (integer, decimal, thousands commas, ``a/b``), or None."""
    matches = _NUM_RE.findall(text or '')
    if not matches:
        return None
    return matches[-1].rstrip(',').replace(' ', '')


def _looks_like_prose(text: str) -> bool:
    """True when ``text`` contains two consecutive plain words (outside LaTeX commands)."""
    stripped = re.sub(r'\\text\{[^{}]*\}', ' ', text)
    return '\n' in text.strip() or bool(_PROSE_RE.search(stripped))


def _answer_from_span(span: str) -> str | None:
    """A bare answer as is; from prose, its last number (or the prose itself if it has none)."""
    span = span.strip()
    if not span:
        return None
    if _looks_like_prose(span):
        return last_number(span) or span
    return span


def extract_answer(text: str | None) -> str | None:
    """The final answer of a model completion, or None when nothing answer-like is found."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return _answer_from_span(tags[-1])
    m = re.search(r'####\s*(.+?)\s*$', text)
    if m:
        return m.group(1)
    return last_number(text)


def extract_gold_answer(solution: str | None) -> str | None:
    """The answer of a gold ``solution``: a worked solution's boxed/tagged/last answer, or a bare one."""
    if solution is None:
        return None
    solution = str(solution)
    if last_boxed(solution) is not None or _ANSWER_TAG_RE.search(solution) or '####' in solution:
        return extract_answer(solution)
    return _answer_from_span(solution)


def _strip_command(s: str, cmd: str) -> str:
    """Replace ``\\cmd{x}`` with ``x`` (innermost-first, repeated)."""
    pattern = re.compile(re.escape(cmd) + r'\s*\{([^{}]*)\}')
    prev = None
    while prev != s:
        prev, s = s, pattern.sub(r'\1', s)
    return s


def _frac_to_slash(s: str) -> str:
    """``\\frac{a}{b}`` / ``\\dfrac`` / ``\\tfrac`` / ``\\frac12`` -> ``(a)/(b)``."""
    s = re.sub(r'\\[dt]?frac\s*(\d)\s*(\d)', r'(\1)/(\2)', s)
    pattern = re.compile(r'\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}')
    prev = None
    while prev != s:
        prev, s = s, pattern.sub(r'(\1)/(\2)', s)
    return s


def normalize_answer(answer: str | None) -> str:
    """A canonical string for an answer (``''`` for None). Percent signs are kept as ``%``."""
    if answer is None:
        return ''
    s = str(answer).strip()
    for junk in ('\\$', '$', '\\!', '\\,', '\\;', '\\ '):
        s = s.replace(junk, '')
    for cmd in ('\\text', '\\textbf', '\\mathrm', '\\mathbf', '\\mbox', '\\operatorname', '\\boxed'):
        s = _strip_command(s, cmd)
    s = re.sub(r'\\(left|right)\b\s*', '', s)
    s = re.sub(r'\^\s*\{?\\circ\}?', '', s).replace('\\circ', '').replace('°', '')
    s = s.replace('\\%', '%').replace('\\displaystyle', '').replace('\\{', '{').replace('\\}', '}')
    s = s.replace('\\cdot', '*').replace('\\times', '*').replace('\\pi', 'pi').replace('\\infty', 'oo')
    s = re.sub(r'\\sqrt\s*\{([^{}]*)\}', r'sqrt(\1)', s)
    s = re.sub(r'\\sqrt\s*(\d+)', r'sqrt(\1)', s)
    s = _frac_to_slash(s)
    s = re.sub(r'(?<=\d),(?=\d{3}(?!\d))', '', s)  # thousands separators
    s = re.sub(r'\s+', '', s)
    s = s.rstrip('.')
    if re.fullmatch(r'[A-Za-z]\w*=[^=<>]+', s):  # "x=5" -> "5"
        s = s.split('=', 1)[1]
    if s.startswith('{') and s.endswith('}') and s.count('{') == 1:
        s = s[1:-1]
    return s


def to_number(answer: str) -> float | None:
    """The value of a normalised plain number: ``-3``, ``2.5``, ``1/2``, ``(1)/(2)``, ``-(1)/(2)``."""
    s = answer.replace('(', '').replace(')', '')
    m = re.fullmatch(r'([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:/(\d+(?:\.\d*)?))?', s)
    if not m:
        return None
    value = float(m.group(2))
    if m.group(3) is not None:
        denominator = float(m.group(3))
        if denominator == 0:
            return None
        value /= denominator
    return -value if m.group(1) == '-' else value


def _numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)


def _numeric_candidates(answer: str) -> list[float]:
    """Values an answer may mean: ``50%`` means 50 or 0.5."""
    if answer.endswith('%'):
        value = to_number(answer[:-1])
        return [] if value is None else [value, value / 100]
    value = to_number(answer)
    return [] if value is None else [value]


_SYMPY_NAMES = {'sqrt', 'pi', 'sin', 'cos', 'tan', 'log', 'ln', 'exp', 'oo', 'E', 'I'}


def _sympy_safe(s: str) -> bool:
    """Short, whitelisted characters, single-letter or known identifiers, no huge powers."""
    if not s or len(s) > MAX_SYMPY_CHARS or not re.fullmatch(r'[\w\s+\-*/^().]*', s) or '_' in s:
        return False
    if any(len(name) > 1 and name not in _SYMPY_NAMES for name in re.findall(r'[A-Za-z]+', s)):
        return False
    powers = s.replace('**', '^')
    for m in re.finditer(r'\^', powers):  # each exponent small and simple: no 9^9^9, no 2^(99*99)
        if not re.match(r'\s*(-?\d{1,2}(?![\d.])|[A-Za-z](?!\w)|\(\s*-?\d{1,2}\s*(/\s*\d{1,2}\s*)?\)|\([A-Za-z]\))',
                        powers[m.end():]):
            return False
    if re.search(r'\^[^+\-*/]*\^', powers):
        return False
    return True


@lru_cache(maxsize=4096)
def _sympy_parse(s: str):
    """A sympy expression for a whitelisted string, or None."""
    if not _sympy_safe(s):
        return None
    try:
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                                standard_transformations)
        transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
        return parse_expr(s.replace('ln', 'log'), transformations=transformations, evaluate=True)
    except Exception:  # sympy raises many types (SyntaxError, TokenError, TypeError, ...)
        return None


def sympy_equal(a: str, b: str) -> bool:
    """Whether two normalised answers are symbolically equal (False when either is not parsable)."""
    ea, eb = _sympy_parse(a), _sympy_parse(b)
    if ea is None or eb is None:
        return False
    try:
        import sympy
        if not ea.free_symbols and not eb.free_symbols:
            va, vb = complex(ea.evalf()), complex(eb.evalf())
            return _numbers_close(va.real, vb.real) and _numbers_close(va.imag, vb.imag)
        return sympy.simplify(ea - eb) == 0
    except Exception:
        return False


def _split_tuple(s: str) -> list[str] | None:
    inner = s[1:-1] if len(s) >= 2 and s[0] + s[-1] in ('()', '[]', '{}') else s
    parts = inner.split(',')
    return parts if len(parts) > 1 else None


def normalized_equal(a: str, b: str) -> bool:
    """Equivalence of two already-normalised answers."""
    if not a or not b:
        return False
    if a == b:
        return True
    ca, cb = _numeric_candidates(a), _numeric_candidates(b)
    if ca and cb:
        return any(_numbers_close(x, y) for x in ca for y in cb)
    ta, tb = _split_tuple(a), _split_tuple(b)
    if ta and tb:
        return len(ta) == len(tb) and all(normalized_equal(x, y) for x, y in zip(ta, tb))
    if ta or tb:
        return False
    return sympy_equal(a.rstrip('%'), b.rstrip('%'))


def answers_equal(prediction: str | None, gold: str | None) -> bool:
    """Whether two extracted answers are equivalent (both None or empty -> False)."""
    return normalized_equal(normalize_answer(prediction), normalize_answer(gold))


def is_correct(completion: str | None, solution: str | None) -> bool:
    """Whether a completion's final answer matches a gold solution (worked or bare)."""
    if solution is None or completion is None:
        return False
    return answers_equal(extract_answer(completion), extract_gold_answer(solution))
