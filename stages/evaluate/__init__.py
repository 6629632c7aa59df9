"""The evaluation stage: retrieval metrics (metrics), search indexes (index) and the report (report).

Only numpy is imported here; the index imports faiss and the report matplotlib when they are used.
"""
