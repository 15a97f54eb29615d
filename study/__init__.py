"""The study: E1-E4 and the other experiments as recipes, cached stages, and the paper-vs-lab
table. `reports/` renders what this hands it; the CLI's `reproduce` runs it."""
