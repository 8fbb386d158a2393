"""What the tests and the benchmarks share: running jobs as a user does (`jobs`), synthetic corpora in DPR's layouts
(`corpora`), tiny DPR models (`models`), a throwaway local Ray (`localray`), waiting for a condition (`poll`),
HTTP load (`load`) and process memory (`rss`). Importable from the repository root, by pytest and by
`python -m benchmarks.<name>` alike."""
