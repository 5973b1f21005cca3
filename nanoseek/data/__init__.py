"""Data: sources (txt/jsonl/parquet/builtin), cleaning, dedup, token shards.

Submodules are imported where used (``from nanoseek.data.sources import
iter_documents``) so that importing the package stays cheap.
"""
