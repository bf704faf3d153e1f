"""The reliability suite (issue 28, section 3): bad input, faults, load and property tests. Each case records
one row of docs/reliability.md (see `report`); regenerate it with

    python -m pytest tests/reliability --reliability-report docs/reliability.md
"""
