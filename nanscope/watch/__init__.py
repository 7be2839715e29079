"""`nanscope.watch(...)`: the training-loop sentinel, its dumps, and agreement across ranks.

`sentinel` (Watcher, watch), `snapshot` (weights, RNG, batch and the dump folder), `ranks` (DDP agreement,
merging per-rank dumps), `attachment` (attach: the sentinel on a criterion's or model's
returned loss terms, for loops nanscope does not own), `report` (WatchReport, NonFiniteStepError, the manifest).
"""

from nanscope._callable_module import make_callable
from nanscope.watch.attachment import AttachReport, Attachment, attach
from nanscope.watch.ranks import merge_rank_dumps
from nanscope.watch.report import NonFiniteStepError, WatchReport
from nanscope.watch.sentinel import Watcher, WatchOptions, watch

__all__ = ["AttachReport", "Attachment", "NonFiniteStepError", "WatchOptions", "WatchReport", "Watcher", "attach", "merge_rank_dumps", "watch"]

make_callable(__name__)  # `nanscope.watch(...)` works after `import nanscope.watch` too
