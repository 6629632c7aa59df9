"""The evaluation stage: scoring the student and the teacher (run), the report (report), `dsmd search` (search)
and the experiments table (experiments). Metrics and indexes are shared: pipeline/retrieval.
"""
