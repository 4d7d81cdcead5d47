"""The LLM questioner (UniGen §3.2): captions in, question–answer pairs (CCQA) out.

Command line: ``python -m unigen.questioner --captions FILE --out FILE --backend NAME``
(see :mod:`unigen.questioner.cli`). In Python, build the parts and call :func:`run`::

    from unigen.questioner import CaptionReader, OutputStore, make_backend, run
    with OutputStore("ccqa.jsonl", run_header={"backend": "rule", "shard": "0/1"}) as store:
        run(CaptionReader(["cc3m.tsv"]), make_backend("rule"), store)
"""

from .backends import BACKENDS, Backend, Failure, GenerationSettings, make_backend
from .errors import BackendError, QuestionerError, UsageError
from .filters import PairFilter, judge_generation, normalize_tokens
from .parsing import parse_generation
from .pipeline import Shard, run
from .prompt import Example, PromptTemplate
from .readers import BadRecord, CaptionReader, CaptionRecord
from .summary import RunStats, build_summary
from .writer import OutputStore

__all__ = [
    "BACKENDS", "Backend", "BackendError", "BadRecord", "CaptionReader", "CaptionRecord", "Example",
    "Failure", "GenerationSettings", "OutputStore", "PairFilter", "PromptTemplate", "QuestionerError",
    "RunStats", "Shard", "UsageError", "build_summary", "judge_generation", "make_backend",
    "normalize_tokens", "parse_generation", "run",
]
