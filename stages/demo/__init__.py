"""The built-in demo: the shapes world (shapes), a small dataset drawn on the fly, and a small BEiT-3 fitted on
it (teacher) that stands in for the official checkpoint. `dsmd demo data` and `dsmd demo teacher` run them
(the DVC stages demo_data and demo_teacher); the rest of the pipeline treats both as user-supplied files.
"""
