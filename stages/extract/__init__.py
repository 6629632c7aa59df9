"""Stage one: run the teacher once over the canonical dataset and fill the feature store."""
