"""Stage 1, generate: an LLM writes search queries for passages until enough pairs exist.

`stage` runs the loop (ledger, concurrency, budgets, rounds), `filters` parses answers and
rejects weak queries (pure functions), `sources` handles Batch API files, imported pairs, user
query examples and the held-out BEIR layout.
"""

from embedforge.generate.filters import parse_queries, reject_reason
from embedforge.generate.sources import import_batch_results, import_pairs, load_user_queries, read_pairs, write_eval_set
from embedforge.generate.stage import STAGE_VERSION, BatchExported, Stats, cost_of, generate, in_flight, request_key, run_delimiter

__all__ = [
    "STAGE_VERSION", "BatchExported", "Stats", "cost_of", "generate", "import_batch_results", "in_flight", "import_pairs", "load_user_queries",
    "parse_queries", "read_pairs", "reject_reason", "request_key", "run_delimiter", "write_eval_set",
]
